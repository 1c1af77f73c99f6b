"""A concurrency ramp for loadtests/locustfile.py: 1, 2, 4, 8 ... users, each
step held --ramp-step-time seconds, up to --ramp-max-users, then the test stops.

It is a file of its own because Locust uses any LoadTestShape it finds in the
files given with -f, and a shape overrides -u/-r/-t: with it in locustfile.py a
fixed short run (CI) would be impossible. Add it only when you want the ramp:

    .venv/bin/locust -f loadtests/locustfile.py,loadtests/ramp_shape.py --headless \\
        --host http://127.0.0.1:8000 --ramp-max-users 16 --ramp-step-time 60 --csv out/ramp

Users think for 0 s by default (see locustfile.py), so users = requests in
flight: each step's rows in the *_stats_history.csv show TTFT/ITL at that
concurrency.
"""

from __future__ import annotations

from locust import LoadTestShape, events

DEFAULT_MAX_USERS = 16
DEFAULT_STEP_TIME_S = 30.0


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("pipeinfer ramp (ramp_shape.py)")
    group.add_argument("--ramp-max-users", type=int, default=DEFAULT_MAX_USERS,
                       help=f"the last step's users; steps double from 1 (default {DEFAULT_MAX_USERS})")
    group.add_argument("--ramp-step-time", type=float, default=DEFAULT_STEP_TIME_S,
                       help=f"seconds each step is held (default {DEFAULT_STEP_TIME_S:g})")


def ramp_steps(max_users: int) -> list[int]:
    """1, 2, 4, ... doubling, the last step exactly max_users (1, 2, 4, 6 for 6)."""
    steps, users = [], 1
    while users < max_users:
        steps.append(users)
        users *= 2
    return [*steps, max(1, max_users)]


class RampShape(LoadTestShape):
    def _option(self, name: str, default: float) -> float:
        options = getattr(getattr(self.runner, "environment", None), "parsed_options", None)
        value = getattr(options, name, None)
        return default if value is None else value

    def tick(self) -> tuple[int, float] | None:
        steps = ramp_steps(int(self._option("ramp_max_users", DEFAULT_MAX_USERS)))
        step = int(self.get_run_time() // self._option("ramp_step_time", DEFAULT_STEP_TIME_S))
        if step >= len(steps):
            return None  # past the last step: stop the test
        # Spawn a whole step within a second, so each step's hold is all at that concurrency.
        return steps[step], float(steps[step])
