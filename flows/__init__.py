"""Prefect flows, the pydantic config and the `distill` command of distill-gap."""
