"""The CaT tree page: ``GET /ui`` on Serve's HTTP port, beside the API (http_app.py includes ``page``).

A person types a question, picks the method and its knobs and presses Solve; the page streams
``POST /v1/solve/stream`` with ``tree_events`` and draws the search tree as it grows (steps coloured by
confidence, pruned and dropped branches greyed with the reason, branch points marked with the
uncertainty that opened them, the chosen path highlighted), and beside it greedy's path for the same
question. Plain JavaScript and SVG in ``caspo/serve/ui`` (shipped as package data): no build step, nothing
fetched from elsewhere at run time.

The static files need no token; ``GET /ui/info`` and the solves do, so with ``$CASPO_AUTH_TOKEN`` set the
page asks for the token once (kept in the tab's sessionStorage) and shows the server's message when a
request is refused.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from ray import serve

from caspo.core.search import BRANCHINGS, METHODS
from caspo.serve.params import SERVED_SCORINGS
from caspo.serve.encoders import search_json

UI_DIR = Path(__file__).with_name("ui")
FILES = {"tree.js": "text/javascript", "tree.css": "text/css"}
PAGE_PATHS = frozenset({"/ui", "/ui/", *(f"/ui/{name}" for name in FILES)})  # public: static, no data

page = APIRouter()


def _service():
    """The replica's CaTService (as http_app's ``service`` dependency; defined here, since http_app includes this router)."""
    return serve.get_replica_context().servable_object.service




@page.get("/ui")
@page.get("/ui/")
async def index():
    return FileResponse(UI_DIR / "index.html", media_type="text/html")


@page.get("/ui/tree.js")
async def script():
    return FileResponse(UI_DIR / "tree.js", media_type=FILES["tree.js"])


@page.get("/ui/tree.css")
async def style():
    return FileResponse(UI_DIR / "tree.css", media_type=FILES["tree.css"])


def page_info(cat) -> dict:
    """What the page shows before a question: the model, the policy version serving now, the defaults a
    ``cat`` request gets (the cat section with the calibration applied) and where τ and the threshold
    came from, and the choices and limits of the form."""
    sv, cal = cat.cfg.serve, cat.calibration
    defaults = cat.cfg.cat.search_config(cal)
    applied = cal is not None and defaults.branching == "adaptive"  # CatConfig.search_config's rule
    return {
        "model": cat.model_id,
        "policy_version": cat.worker.version,
        "method": sv.method,
        "cat": search_json(defaults),
        "calibration": {
            "tau": defaults.tau,
            "branch_threshold": search_json(defaults)["branch_threshold"],
            "uncertainty": defaults.uncertainty,
            "source": cal.path if applied else "the config's cat section (no calibration file applies)",
        },
        "choices": {"method": list(METHODS), "branching": list(BRANCHINGS), "scoring": list(SERVED_SCORINGS)},
        "limits": {"max_k": sv.max_k, "max_steps": sv.max_max_steps, "max_question_chars": sv.max_question_chars},
    }


@page.get("/ui/info")
async def info(cat=Depends(_service)):
    return page_info(cat)
