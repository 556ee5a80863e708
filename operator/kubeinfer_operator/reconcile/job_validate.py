"""What validating a batch kind (TransformJob, CompilationJob) does whatever the kind: PURE.

Both kinds get a name their Jobs and pods can extend, report every problem at
once (the schema's and the backend's) as one ``InvalidSpec`` error naming each
field, and phrase pydantic's messages the same way. Each kind's ``*_validate``
module adds only the problems of its own spec.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ValidationError

from kubeinfer_operator.api.endpoint import format_validation_error
from kubeinfer_operator.errors import SpecError

#: Job names add a suffix (``-finalize``, ``-compile``) and pod names another to this:
#: DNS labels of <= 63.
MAX_NAME = 40
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

S = TypeVar("S", bound=BaseModel)


class InvalidJob(SpecError):
    """The job cannot run as written; ``problems`` name each field and fix."""

    #: The kind, for the message ("TransformJob").
    kind: ClassVar[str]

    def __init__(self, job: str, problems: list[str]) -> None:
        self.job = job
        self.problems = problems
        super().__init__(f"{self.kind} {job} is invalid: " + "; ".join(problems))


def clean_problem(problem: str) -> str:
    problem = re.sub(r"^spec: (spec\.)", r"\1", problem.strip())
    return problem.rstrip(".")


def job_name_problems(name: str, kind: str) -> list[str]:
    if len(name) > MAX_NAME or not _NAME.match(name):
        return [f"metadata.name: {name!r} must start with a letter, use only lowercase letters, "
                f"digits and '-', and have at most {MAX_NAME} characters; create the "
                f"{kind} under such a name"]
    return []


def parse_job_spec(name: str, namespace: str | None, spec: Any, model: type[S],
                   spec_problems: Callable[[S], list[str]], invalid: type[InvalidJob]) -> S:
    """Parse ``spec`` and check it; raise ``invalid`` listing every problem."""
    qualified = f"{namespace}/{name}" if namespace else name
    problems = job_name_problems(name, invalid.kind)
    try:
        parsed = model.model_validate(spec)
    except ValidationError as exc:
        problems += [clean_problem(p)
                     for p in format_validation_error(exc, "spec").splitlines()]
        raise invalid(qualified, problems) from exc
    problems += spec_problems(parsed)
    if problems:
        raise invalid(qualified, [clean_problem(p) for p in problems])
    return parsed
