"""``python -m posttrain.trainer``: the trainer image's entrypoint.

Reads the recipe (a PostTrainJob manifest) from ``--recipe``, $POSTTRAIN_RECIPE or
/etc/posttrain/recipe.yaml, refuses an algorithm this trainer has not built before touching JAX,
joins the other hosts (``distributed.initialize``), then runs the shared loop. Exit codes: 0 done
(or preempted with a checkpoint saved), 78 (runtime.EXIT_CONFIG) bad recipe or unbuilt
algorithm, which fails the job without restarts, 1 training failed.
"""

from __future__ import annotations

import argparse
import os
import sys

from posttrain import runtime
from posttrain.api import JobInvalid, load_documents, parse_job
from posttrain.api.v1alpha1 import PostTrainJob
from posttrain.trainer import algorithms


def read_recipe(path: str) -> PostTrainJob:
    docs = load_documents(path)
    jobs = [d for d in docs if d.get("kind") == "PostTrainJob"]
    if len(jobs) != 1:
        raise JobInvalid([], f"{path}: expected one PostTrainJob document, found {len(jobs)}")
    return parse_job(jobs[0], source=path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m posttrain.trainer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--recipe", default=os.environ.get(runtime.RECIPE) or runtime.RECIPE_PATH)
    parser.add_argument("--output", help="output folder (default: spec.output.dir)")
    args = parser.parse_args(argv)
    try:
        job = read_recipe(args.recipe)
        algorithms.check(job.spec.algorithm)
    except (OSError, JobInvalid, algorithms.AlgorithmNotBuilt) as err:
        print(f"posttrain trainer: {err}", file=sys.stderr)
        if isinstance(err, JobInvalid):
            for e in err.errors:
                print(f"  {e}", file=sys.stderr)
        return runtime.EXIT_CONFIG
    output = args.output or job.spec.output.dir
    if not output:
        print(
            "posttrain trainer: spec.output.dir is not set and no --output was given",
            file=sys.stderr,
        )
        return runtime.EXIT_CONFIG

    import jax

    from posttrain.trainer import distributed, storage

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # a rerun (resume) skips recompiling
        cache = os.path.join(storage.cache_root(), "jax")
        try:
            os.makedirs(cache, exist_ok=True)
        except OSError:  # e.g. a read-only home in a locked-down pod: just compile
            pass
        else:
            jax.config.update("jax_compilation_cache_dir", cache)
    if os.environ.get(runtime.ROLE) == runtime.ROLE_ROLLOUT:  # async RL: one process, no mesh
        from posttrain.trainer.async_rl.worker import serve

        return serve(job, output)
    distributed.initialize()
    from posttrain.progress import ProgressReporter
    from posttrain.trainer.loop import train

    train(job, output, reporter=ProgressReporter())
    return 0


if __name__ == "__main__":
    sys.exit(main())
