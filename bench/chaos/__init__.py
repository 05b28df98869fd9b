"""The fault suite (`make chaos`): the real pipeline through one fault at a time, checked by the caches.

    .venv/bin/python -m bench.chaos            # every fault, about 12 minutes
    .venv/bin/python -m bench.chaos --quick    # a few faults, shorter, for development

It brings up a stack of its own (`stack.py`: `.stack-chaos/`, every port the default
+ 1000, so the shared stack on the default ports is never touched), runs the mapper
and every (region, sink) as separate `cachesync run` processes (`pipeline.py`), and
for each fault streams realistic events (`traffic.py`), injects the fault for a fixed
time (`faults.py`), lets the pipeline recover and checks, in the caches themselves,
that every purge happened (`oracle.py`):

- before publishing an event, it writes in each region's Redis the keys (and a member
  of each tag) that the event's purge must delete, and fetches through each region's
  Varnish the pages it must purge; the mapper's rules, run offline on the same events,
  say which;
- after recovery, each key must be gone, each page must come from the origin again
  (a new `X-Origin-Generation`), and each Cloudflare item and CloudFront path must be
  covered by a purge the provider accepted after the event happened (the Cloudflare
  stand-in's ledger of accepted calls, moto's invalidations).

Results: `bench/results/chaos.md` and `chaos.json` (`report.py`).
"""
