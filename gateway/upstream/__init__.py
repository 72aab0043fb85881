"""Upstreams: endpoints, load balancing and the HTTP/1.1 keep-alive connection pool."""
