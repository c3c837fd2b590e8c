"""MaaS services: registry, gateway, inference workers, and what they share."""
