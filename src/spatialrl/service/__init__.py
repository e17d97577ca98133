"""SpatialScore as a service: the typed service config, the HTTP API's request and answer
schemas with their input checks, and a Python client. Pure: no Ray imports; the Ray Serve
application around them is spatialrl.actors.service."""
