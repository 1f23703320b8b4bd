"""The progress bar of `stripes prepare`: documents and tokens so far, and their rates.

The total is not known in advance (compressed inputs give no line count), so each source shows
counts and rates rather than a fraction. Shown only when asked (the CLI asks when stderr is a
terminal), so tests and logs stay quiet.
"""

from __future__ import annotations

from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.text import Text


class _Rates(ProgressColumn):
    def render(self, task: Task) -> Text:
        seconds = max(task.elapsed or 0.0, 1e-9)
        docs, tokens = task.fields["documents"], task.completed
        return Text(f"{docs:>9,} docs {tokens:>13,.0f} tokens | {docs / seconds:>8,.0f} docs/s "
                    f"{tokens / seconds:>11,.0f} tokens/s")


class PrepareProgress:
    def __init__(self, enabled: bool) -> None:
        self._bar = Progress(SpinnerColumn(), TextColumn("{task.description:<12}"), _Rates(),
                             disable=not enabled)
        self._task = None

    def __enter__(self) -> PrepareProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def start(self, source: str) -> None:
        if self._task is not None:
            self._bar.stop_task(self._task)
        self._task = self._bar.add_task(source, total=None, documents=0)

    def advance(self, documents: int, tokens: int) -> None:
        task = self._bar.tasks[-1]
        self._bar.update(self._task, advance=tokens,
                         documents=task.fields["documents"] + documents)
