"""The pack in the real ComfyUI frontend: a real server and headless Chromium (Debian's package).

A user finds each HyperDreamBooth node through the canvas search box (double-click,
type its name, Enter) and the node appears with one widget per value input and one
socket per connection input, as /object_info declares them. A screenshot of every
node on one canvas is saved to test-artifacts/browser_nodes.png.

Needs /usr/bin/chromium and /usr/bin/chromedriver (scripts/install_browser.sh) and
selenium; skips with the reason otherwise. Nothing is downloaded at test time.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO, "test-artifacts")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Flags for a root, offline, screenless machine (no sandbox, no background traffic).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

pytestmark = pytest.mark.server


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (run scripts/install_browser.sh)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-dev.txt)"
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from devtools.comfy_server import ComfyServer, copy_pack

    root = tmp_path_factory.mktemp("browser")
    base = root / "base"
    for d in ("custom_nodes", "models", "input", "output", "temp", "user/default/workflows"):
        (base / d).mkdir(parents=True, exist_ok=True)
    # A returning user: no first-run templates dialog over the canvas.
    (base / "user/default/comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    copy_pack(str(base / "custom_nodes"))
    import sys

    with ComfyServer(sys.executable, str(base), str(root / "server.log")) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver
    profile = tempfile.mkdtemp(prefix="hdb-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(server.url)
        _wait(driver, "return !!(window.app && app.graph && app.canvas && window.LiteGraph"
                      " && LiteGraph.registered_node_types['HDB_ApplyLiDB'])", "the frontend to load our nodes")
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, script: str, what: str, timeout: float = 60.0, args: tuple = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def object_info(server):
    return {k: v for k, v in server.get_json("/object_info").items() if k.startswith("HDB")}


def _expected(info: dict) -> tuple[list[str], list[str]]:
    """(widget input names, socket-only input names) that /object_info declares for a node."""
    widgets, sockets = [], []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind = spec[0]
            (widgets if isinstance(kind, list) or kind in WIDGET_TYPES else sockets).append(name)
    return widgets, sockets


_DESCRIBE = """
const n = app.graph._nodes[app.graph._nodes.length - 1];
return n && {type: n.type, title: n.title, widgets: (n.widgets || []).map(w => w.name),
             inputs: (n.inputs || []).map(i => i.name), outputs: (n.outputs || []).map(o => o.type),
             size: [n.size[0], n.size[1]], count: app.graph._nodes.length};
"""


def test_node_list_matches_the_server(object_info):
    with open(os.path.join(REPO, "node_list.json"), encoding="utf-8") as f:
        assert set(json.load(f)) == set(object_info)


def test_each_node_is_found_by_search_and_renders_its_widgets(browser, object_info):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    canvas = browser.find_element(By.ID, "graph-canvas")
    for node_id, info in sorted(object_info.items()):
        browser.execute_script("app.graph.clear(); app.canvas.setDirty(true, true);")
        ActionChains(browser).move_to_element(canvas).double_click().perform()
        box = _wait(browser, "const e = document.activeElement;"
                             "return e && e.tagName === 'INPUT' ? e : null;", "the node search box")
        box.send_keys(info["display_name"])
        time.sleep(0.8)  # the result list filters as one types
        box.send_keys(Keys.ENTER)
        node = _wait(browser, _DESCRIBE, f"{node_id} to be added")
        assert node["type"] == node_id and node["count"] == 1, node
        assert node["title"] == info["display_name"]
        widgets, sockets = _expected(info)
        assert set(widgets) <= set(node["widgets"]), (node_id, widgets, node["widgets"])
        assert set(sockets) <= set(node["inputs"]), (node_id, sockets, node["inputs"])
        assert len(node["outputs"]) == len(info["output"])
        assert node["size"][0] > 100 and node["size"][1] > 20


def test_all_nodes_on_one_canvas_screenshot(browser, object_info):
    ids = sorted(object_info)
    placed = browser.execute_script("""
        app.graph.clear();
        const ids = arguments[0]; let x = 100, y = 210, rowH = 0;
        for (const id of ids) {
            const n = LiteGraph.createNode(id);
            n.pos = [x, y]; app.graph.add(n);
            rowH = Math.max(rowH, n.size[1]);
            x += n.size[0] + 40;
            if (x > 1300) { x = 100; y += rowH + 70; rowH = 0; }
        }
        app.canvas.ds.offset[0] = 0; app.canvas.ds.offset[1] = 0; app.canvas.ds.scale = 0.85;
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        return app.graph._nodes.map(n => n.type);
    """, ids)
    assert sorted(placed) == ids
    time.sleep(0.5)
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, "browser_nodes.png")
    assert browser.save_screenshot(path)
    assert os.path.getsize(path) > 10_000
    errors = [e["message"] for e in browser.get_log("browser")
              if e["level"] == "SEVERE" and ("HDB" in e["message"] or "HyperDreamBooth" in e["message"])]
    assert not errors, errors



# Innermost elements whose visible text is exactly arguments[0].
_BY_TEXT = """
const t = arguments[0];
return [...document.querySelectorAll('body *')].filter(e => (e.innerText || '').trim() === t
    && ![...e.children].some(c => (c.innerText || '').trim() === t));
"""


def test_each_example_workflow_opens_from_the_templates_dialog(browser, server):
    """A user opens Templates -> ComfyUI-HyperDreamBooth -> a card: the graph loads and no node is missing."""
    import glob

    from devtools.comfy_server import PACK_DIR_NAME

    files = sorted(glob.glob(os.path.join(REPO, "workflows", "*.json")))
    listed = server.get_json("/workflow_templates").get(PACK_DIR_NAME, [])
    assert sorted(listed) == [os.path.basename(f)[:-5] for f in files]
    for path in files:
        name = os.path.basename(path)[:-5]
        with open(path, encoding="utf-8") as f:
            ui = json.load(f)
        browser.execute_script("app.graph.clear(); app.extensionManager.command.execute('Comfy.BrowseTemplates');")
        section = _wait(browser, "const r = (function(){" + _BY_TEXT + "}).apply(null, arguments); return r.pop();",
                        "our section in the templates dialog", args=(PACK_DIR_NAME,))
        browser.execute_script("arguments[0].click()", section)
        card = _wait(browser, "const r = (function(){" + _BY_TEXT + "}).apply(null, arguments);"
                              "return r.filter(e => e.tagName === 'H3').pop();", f"the {name} card", args=(name,))
        browser.execute_script("arguments[0].click()", card)
        loaded = _wait(browser, "return app.graph._nodes.length === arguments[0] && app.graph._nodes.map(n => n.type);",
                       f"{name} to load", args=(len(ui["nodes"]),))
        assert sorted(loaded) == sorted(n["type"] for n in ui["nodes"])
        assert browser.execute_script("return app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type])"
                                      ".map(n => n.type);") == []
        text = browser.execute_script("return document.body.innerText").lower()
        assert "missing node" not in text, f"{name}: the frontend reports missing nodes"
        assert len(browser.execute_script("return Object.keys(app.graph.links || {})")) == len(ui["links"])
        if name.startswith("1_"):
            os.makedirs(ARTIFACTS, exist_ok=True)
            assert browser.save_screenshot(os.path.join(ARTIFACTS, "browser_template_1.png"))
