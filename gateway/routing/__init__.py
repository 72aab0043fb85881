"""Routing: path templates, the immutable routing table and the pure function that builds it."""

from gateway.routing.table import Match, Route, RoutingTable

__all__ = ["Match", "Route", "RoutingTable"]
