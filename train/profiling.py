"""A window of optimizer steps under torch.profiler: where a training step's wall time goes.

Enabled with `tracking.profile_steps` (and `tracking.profile_start_step`) on rank 0. Writes
`<stage>/profile/trace.json` (Chrome trace: open it in Perfetto or chrome://tracing) and
`<stage>/profile/summary.txt`: wall clock against device-kernel time per step, which says
whether the step is bound by the device or by the host (Python, launches, synchronisation),
then the ops that take the most time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

logger = logging.getLogger(__name__)


def device_kernel_ms(events: Iterable[FunctionEvent]) -> float:
    """Milliseconds of device kernels among profiler events, streams summed.

    Only the kernel events count: an op's self device time is its kernels' time a second time.
    """
    return (
        sum(event.time_range.elapsed_us() for event in events if event.device_type == torch.autograd.DeviceType.CUDA)
        / 1e3
    )


class StepProfiler:
    """Profiles optimizer steps `start_step` .. `start_step + steps - 1` (1-based) when enabled.

    A context manager: leaving it ends a window the loop did not finish (a shorter stage, an error).
    """

    def __init__(self, out_dir: Path, start_step: int, steps: int, device: torch.device, enabled: bool) -> None:
        self.out_dir = out_dir
        self.start_step = start_step
        self.last_step = start_step + steps - 1
        self.device = device
        self.enabled = enabled and steps > 0
        self._profiler: profile | None = None
        self._started = 0.0
        self._first = 0
        self._last_finished = 0

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step_starting(self, step: int) -> None:
        """Call before optimizer step `step` (1-based) runs."""
        if not self.enabled or self._profiler is not None or not self.start_step <= step <= self.last_step:
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self._profiler = profile(activities=activities)
        self._profiler.__enter__()
        self._first = step
        self._started = time.perf_counter()

    def step_finished(self, step: int) -> None:
        """Call after optimizer step `step` has run."""
        if self._profiler is None:
            return
        self._last_finished = step
        if step >= self.last_step:
            self._finish()

    def close(self) -> None:
        """End a window the stage did not run to its end (e.g. a shorter budget)."""
        if self._profiler is not None:
            self._finish()

    def _finish(self) -> None:
        profiler, self._profiler = self._profiler, None
        self.enabled = False
        # The profile is a diagnostic: a failure to write it must not end the training run, and the
        # profiler is stopped whatever happens (one left running crashes the interpreter at exit).
        try:
            try:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                wall_s = time.perf_counter() - self._started
            finally:
                profiler.__exit__(None, None, None)
            self._write_profile(profiler, wall_s)
        except Exception:  # noqa: BLE001
            logger.exception("profiling window failed; training continues without a profile")

    def _write_profile(self, profiler: profile, wall_s: float) -> None:
        steps = max(self._last_finished - self._first + 1, 1)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.out_dir / "trace.json"))
        averages = profiler.key_averages()
        device_ms = device_kernel_ms(profiler.events())
        host_ms = sum(event.self_cpu_time_total for event in averages) / 1e3
        wall_ms = wall_s * 1e3
        summary = f"steps {self._first}-{self._first + steps - 1}: {wall_ms / steps:.1f} ms of wall clock a step; "
        if self.device.type == "cuda":
            summary += (
                f"device kernels {device_ms / steps:.1f} ms a step ({100 * device_ms / wall_ms:.0f}% of the "
                "wall clock, streams summed); "
            )
        summary += f"profiled host ops {host_ms / steps:.1f} ms a step"
        sort_key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        tables = [averages.table(sort_by=sort_key, row_limit=40)]
        if self.device.type == "cuda":
            tables.append(averages.table(sort_by="self_cpu_time_total", row_limit=25))
        (self.out_dir / "summary.txt").write_text("\n\n".join([summary, *tables]) + "\n")
        logger.info("profile: %s; details in %s", summary, self.out_dir)
