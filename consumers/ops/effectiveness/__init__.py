"""Cache effectiveness measured where the caches are: each tier's own hit and miss counts per
region (`tiers`), read at an interval and recorded (`recorder`), what each invalidation costs
in origin requests and what warming saves (`cost`), and the page that shows it (`report`).
"""
