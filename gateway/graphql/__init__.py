"""GraphQL at the gateway: per-route policies and one stitched endpoint over services.

- ``policy``: parse (graphql-core), measure depth/aliases/complexity/introspection,
  persisted queries (APQ hashes, allow-lists);
- ``routing``: attaches policies to GraphQL routes and adds the combined endpoint when
  the routing table is built;
- ``stitch``: merges the services' schemas by root field and splits operations;
- ``handler``: the request path (``GatewayApp.handle_http`` hands GraphQL routes here).

Configuration: the top-level ``graphql:`` section holds the defaults of every GraphQL
route; a static route becomes a GraphQL route with its own ``graphql:`` key.
"""
