vcl 4.1;
# The local HTTP edge in front of the origin (deploy/local/standins/origin.py), started by
# deploy/local/up.d/varnish.sh. It answers what the http_purge sink sends:
#   PURGE <url>                          drop one object (by URL and Host)
#   PURGE / with xkey-purge: k1 k2 ...   drop every object carrying any of these surrogate
#                                        keys; each object carries its URL's key too (below),
#                                        so one request drops many URLs
#   PURGE / with xkey-softpurge: k1 ...  expire them but keep serving stale (grace)
#   BAN / with x-ban-url: <regex>        invalidate every object whose URL matches
# only from loopback, and marks each response X-Cache: HIT, STALE or MISS.

import std;
import xkey;

# up.d/varnish.sh rewrites this port from ORIGIN_PORT.
backend origin {
    .host = "127.0.0.1";
    .port = "16090";
    .connect_timeout = 2s;
    .first_byte_timeout = 10s;
}

acl purgers {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    if (req.method == "PURGE" || req.method == "BAN") {
        if (!(client.ip ~ purgers)) {
            return (synth(405, "Not allowed"));
        }
    }
    if (req.method == "PURGE") {
        if (req.http.xkey-purge) {
            set req.http.x-purged = xkey.purge(req.http.xkey-purge);
            return (synth(200, "Purged " + req.http.x-purged));
        }
        if (req.http.xkey-softpurge) {
            set req.http.x-purged = xkey.softpurge(req.http.xkey-softpurge);
            return (synth(200, "Soft-purged " + req.http.x-purged));
        }
        return (purge);
    }
    if (req.method == "BAN") {
        if (!req.http.x-ban-url) {
            return (synth(400, "BAN needs x-ban-url"));
        }
        ban("obj.http.x-url ~ " + req.http.x-ban-url);
        return (synth(200, "Banned"));
    }
    if (req.method != "GET" && req.method != "HEAD") {
        return (pass);
    }
    # The platform's pages are public; cookies must not split the cache.
    unset req.http.Cookie;
    return (hash);
}

sub vcl_backend_response {
    # For BAN: lurker-friendly bans match on the object, not the request.
    set beresp.http.x-url = bereq.url;
    # Besides the origin's surrogate keys, every object carries one for its own URL (path
    # and query, whatever the Host), so that the http_purge sink purges up to
    # max_keys_per_request URLs in one xkey-purge request instead of a PURGE each. xkey
    # splits keys on whitespace and commas, so the URL's "%" and "," are escaped: /a,b has
    # the key url:/a%2Cb, and /a%2Cb the key url:/a%252Cb (consumers/keys.py url_xkey makes
    # the same key from a purged URL). The origin's xkey headers are joined into one first:
    # setting a header drops its other copies.
    std.collect(beresp.http.xkey, " ");
    set beresp.http.xkey = beresp.http.xkey + " url:" +
        regsuball(regsuball(bereq.url, "%", "%25"), ",", "%2C");
    # Soft-purged objects stay servable while the origin is asked again.
    set beresp.grace = 1h;
}

sub vcl_deliver {
    if (obj.hits > 0) {
        if (obj.ttl <= 0s) {
            set resp.http.X-Cache = "STALE";
        } else {
            set resp.http.X-Cache = "HIT";
        }
    } else {
        set resp.http.X-Cache = "MISS";
    }
    set resp.http.X-Cache-Hits = obj.hits;
    unset resp.http.x-url;
}
