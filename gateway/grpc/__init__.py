"""gRPC and gRPC-Web for the gateway.

* ``gateway.grpc.server``: the gRPC listener on ``server.grpc_port``
  (:func:`~gateway.grpc.server.start_grpc_listener`), a generic relay that routes calls
  by their path ``/{package.Service}/{Method}`` through the same routing table and
  plugin chains as HTTP.
* ``gateway.grpc.web``: gRPC-Web on the HTTP listener, translated into real gRPC calls.
* ``gateway.grpc.forwarder``: what both share (upstream channels, endpoint choice,
  accounting, the drain at shutdown).

Importing this package does not import grpcio; the submodules above do.
``gateway.grpc.content`` (the gRPC-Web content-type check on the HTTP hot path) never
does.
"""
