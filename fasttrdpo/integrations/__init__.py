"""Integrations with other training libraries. Each submodule is the only place that imports its peer."""
