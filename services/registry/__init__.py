"""The MaaS model registry: models, versions and deployments (``maas.registry.v1``)."""
