"""The CaT tree page (GET /ui) as a person uses it: a real `caspo serve` (local Ray, the tiny model, a
bearer token) and Debian's headless Chromium driven by Selenium. One server and one browser for all
assertions: the page asks for the token, draws the tree a question's search grows, highlights one path,
greys the branch τ pruned, answers what the API answers for the same seed, shows greedy beside it, and
shows the server's message for a request it refuses.

``CASPO_UI_SCREENSHOT=docs/img/cat-tree.png`` also writes the screenshot there (README's image); it is
always written to the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from caspo.netutil import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tree-page-token"
QUESTION = "12+7*3-5"
# Algorithm 2 (branching always) with k 3: at τ 0.85 one branch of this question is pruned (seed 7)
SEARCH = {"branching": "always", "k": 3, "tau": 0.85, "seed": 7}
START_DEADLINE_S = 240  # a start that takes longer has failed (not a timing assertion)
WAIT_S = 120



def _browser_paths() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed (make setup installs them: apt-get install -y chromium chromium-driver)")
    return chromium, driver


def _call(url: str, body: dict | None = None, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`caspo serve` as a person starts it, with $CASPO_AUTH_TOKEN set; its URL."""
    _browser_paths()
    root = tmp_path_factory.mktemp("tree_page")
    http, grpc_port = free_port(), free_port()
    env = {**os.environ, "CASPO_AUTH_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "caspo.cli", "serve", "--set", f"serve.http_port={http}", "--set", f"serve.grpc_port={grpc_port}",
           "--set", f"serve.policy_file={root}/policy.json", "--set", "mesh.num_cpus=2"]
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while "serving;" not in (root / "serve.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"caspo serve did not start (exit {proc.poll()}):\n{(root / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: caspo serve shuts Serve and Ray down
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this test started
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = _browser_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1600,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _text(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def _visible(driver, css: str) -> bool:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return bool(found) and found[0].is_displayed()


def _fill(driver, field: str, value) -> None:
    box = driver.find_element(By.ID, field)
    box.clear()
    box.send_keys(str(value))


def test_the_page_draws_the_search_tree_and_answers_as_the_api_does(server, browser, tmp_path):
    wait = WebDriverWait(browser, WAIT_S)
    browser.get(f"{server}/ui")
    # the token: the page's first call is refused, it shows the server's message and asks once
    wait.until(lambda d: _visible(d, "#token-box"))
    assert "missing or wrong bearer token" in _text(browser, "#error")
    _fill(browser, "token", TOKEN)
    browser.find_element(By.ID, "token-save").click()
    wait.until(lambda d: _text(d, "#policy-version") == "v0")
    assert not _visible(browser, "#error") and not _visible(browser, "#token-box")
    assert _text(browser, "#cal-source") == "the config's cat section (no calibration file applies)"
    assert _text(browser, "#cal-tau") == "0.00" and _text(browser, "#cal-threshold").startswith("0.50 nats")

    # the same request to the API, with the whole tree
    status, api = _call(f"{server}/v1/solve", {"question": QUESTION, "method": "cat", "with_tree": True, **SEARCH})
    assert status == 200 and api["has_answer"] and api["branches_pruned"] >= 1, api
    _, greedy = _call(f"{server}/v1/solve", {"question": QUESTION, "method": "greedy", "seed": SEARCH["seed"]})

    _fill(browser, "question", QUESTION)
    browser.find_element(By.CSS_SELECTOR, "#branching option[value=always]").click()
    for field in ("k", "tau", "seed"):
        _fill(browser, field, SEARCH[field])
    browser.find_element(By.ID, "solve").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-solved") == "1")

    assert _text(browser, "#cat-answer") == api["answer"]
    assert _text(browser, "#cat-confidence") == f"{api['confidence']:.3f}"
    assert _text(browser, "#cat-policy") == f"v{api['policy_version']}"
    assert _text(browser, "#greedy-answer") == greedy["answer"]
    assert "method cat · k 3 · τ 0.85" in _text(browser, "#cat-search")

    # every node of the API's tree is drawn, with its status
    drawn = {int(g.get_attribute("data-id")): g for g in browser.find_elements(By.CSS_SELECTOR, "#cat-tree g.node[data-id]")}
    assert sorted(drawn) == [n["id"] for n in api["tree"]]
    for n in api["tree"]:
        assert n["status"] in drawn[n["id"]].get_attribute("class").split()
    # one highlighted path: the answer's steps, each the child of the one before, ending in the completed step
    chosen = browser.find_elements(By.CSS_SELECTOR, "#cat-tree g.node.chosen")
    parents = {int(g.get_attribute("data-id")): int(g.get_attribute("data-parent")) for g in chosen}
    assert len(chosen) == len(api["steps"]) == len(browser.find_elements(By.CSS_SELECTOR, "#cat-tree path.edge.chosen"))
    leaves = [i for i in parents if i not in parents.values()]
    assert len(leaves) == 1
    path, node = [], leaves[0]
    while node != 0:
        path.append(node)
        node = parents[node]  # a KeyError here: the highlighted nodes are not one path from the question
    tree = {n["id"]: n for n in api["tree"]}
    assert [tree[i]["step"] for i in reversed(path)] == [s["text"] for s in api["steps"]]
    assert tree[leaves[0]]["status"] == "completed"
    # the branch τ pruned is greyed, with the reason
    pruned = [n["id"] for n in api["tree"] if n["status"] == "pruned"]
    for i in pruned:
        g = drawn[i]
        assert "pruned: C under τ 0.85" in g.text
        fill = browser.execute_script("return getComputedStyle(arguments[0]).fill", g.find_element(By.CSS_SELECTOR, "rect"))
        assert fill == "rgb(230, 230, 230)"
    # branch points (Algorithm 2 branches at every live node) and greedy's path beside
    assert browser.find_elements(By.CSS_SELECTOR, "#cat-tree g.expansion")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#greedy-tree g.node.chosen")) == len(greedy["steps"])
    assert _text(browser, "#compare")

    shot = tmp_path / "cat-tree.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("CASPO_UI_SCREENSHOT"):
        Path(os.environ["CASPO_UI_SCREENSHOT"]).write_bytes(shot.read_bytes())

    # a request the server refuses shows its message
    _fill(browser, "question", "48/6+1")
    browser.find_element(By.ID, "solve").click()
    wait.until(lambda d: _visible(d, "#error"))
    assert "division" in _text(browser, "#error") and "HTTP 422" in _text(browser, "#error")
    wait.until(lambda d: d.find_element(By.ID, "solve").is_enabled())

    # the recommended CaT (adaptive): each branch point is marked with the probe uncertainty that opened it
    _, adaptive = _call(f"{server}/v1/solve", {"question": QUESTION, "with_tree": True, "seed": SEARCH["seed"]})
    opened = {n["parent"]: n["uncertainty"] for n in adaptive["tree"] if n["branched"]}
    assert opened, adaptive["tree"]  # this question's first step is unsure enough to branch
    _fill(browser, "question", QUESTION)
    browser.find_element(By.CSS_SELECTOR, "#branching option[value='']").click()
    for field in ("k", "tau"):
        browser.find_element(By.ID, field).clear()
    browser.find_element(By.ID, "solve").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-solved") == "2")
    assert not _visible(browser, "#error") and _text(browser, "#cat-answer") == adaptive["answer"]
    marks = {int(g.get_attribute("data-id")): g.text for g in browser.find_elements(By.CSS_SELECTOR, "#cat-tree g.expansion")}
    assert marks == {parent: f"max_entropy {u:.2f} > 0.50" for parent, u in opened.items()}
