"""In-test stand-ins for Kubernetes, Consul and Eureka that speak their wire protocols."""
