"""Ray Serve: the app, its ingress, LLM replicas and request routers."""
