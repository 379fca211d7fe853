"""Pipeline stages of distill-gap: plain functions first, thin Prefect tasks last in each module."""


def step(name: str, **options):
    """A Prefect task whose runs are named by their step (`evaluate`, not Prefect's `evaluate-3f1`), so the task-run
    lists of the Prefect UI read as the pipeline does; `options` as for prefect.task."""
    from prefect import task

    return task(name=name, task_run_name=name, **options)
