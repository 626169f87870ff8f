"""Which processes are this test's own Ray actors (tests/reliability), from the GCS actor table.

``ray.util.state.list_actors`` needs the dashboard (tests run without it), and process titles would
also match the actors of any other Ray on the machine (another ``caspo serve``, another test run).
"""

from __future__ import annotations

from ray._private import state


def alive_actor_pids(class_name: str) -> list[int]:
    """Pids of the live actors of class ``class_name`` in the Ray this process is connected to."""
    return sorted(
        a["Pid"]
        for a in state.actors().values()
        if a.get("ActorClassName") == class_name and a.get("State") == "ALIVE" and a.get("Pid")
    )
