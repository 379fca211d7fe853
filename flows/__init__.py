"""Prefect flows, the pydantic config and the `distill` command of distill-gap."""

from distill_gap.ops.quiet import quiet_libraries

quiet_libraries()  # before any flow imports torch, torchao or INC: their unactionable messages never show
