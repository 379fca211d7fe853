"""Pipeline stages of distill-gap: plain functions first, thin Prefect tasks last in each module."""
