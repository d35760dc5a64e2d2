"""The pack in ComfyUI's real web frontend, driven through Chromium with Playwright.

One headless ComfyUI server (harness/comfy_server.py, with the frontend its requirements
pin) and one headless Chromium for the module. The browser is the system's Chromium
(scripts/setup_env.sh installs Debian's `chromium` when none is found; DTC_CHROMIUM picks
another binary): `playwright install` needs the internet. No Chromium, or one that does not
start, is a failure with the reason, never a skip.

* every workflow in workflows/ loads the way a dropped or opened file does (app.handleFile):
  each node type is registered, the frontend reports no missing node (the error overlay,
  any dialog) and keeps every widget value;
* a real-model workflow opened while its model files are missing makes the frontend list
  them in its Errors panel with a Download button each, for the URL and folder its loaders'
  download metadata (node properties.models) give;
* hovering each widget of the DuCa Cache node shows the tooltip /object_info gives;
* the reference workflow queued with the Run button finishes, and the summary the node
  sends with PromptServer.send_progress_text shows on the node in the page.

The server's models folders hold empty files named as the workflows' loaders name them, and
its input folder the images they load, so a load that warns about anything is a failure.

DTC_SCREENSHOT=docs/node_in_graph.png also saves the graph after the run as a PNG (the README's
picture): `DTC_SCREENSHOT=docs/node_in_graph.png python -m pytest tests/test_browser.py -k run_button`.
"""
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

import workflow_tools as wt  # harness/, on sys.path through conftest
from comfy_server import execution_errors, start_server
from test_server import _write_input_images

REPO = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("DTC_COMFYUI", REPO / ".dtc" / "ComfyUI")).resolve()
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
REFERENCE = REPO / "workflows" / "shapes_reference_duca.json"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# Where the loaders of the example workflows look for the files they name.
LOADER_FOLDERS = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders",
                  "DualCLIPLoader": "text_encoders", "TripleCLIPLoader": "text_encoders",
                  "QuadrupleCLIPLoader": "text_encoders", "VAELoader": "vae",
                  "CLIPVisionLoader": "clip_vision", "CheckpointLoaderSimple": "checkpoints"}
# A returning user: no template browser on start, the shortest tooltip delay the setting allows.
SETTINGS = {"Comfy.TutorialCompleted": True, "LiteGraph.Node.TooltipDelay": 100}
UI_TIMEOUT_MS = 60_000
CONSOLE_ERRORS: list[str] = []   # the page's, for failure messages
RUN_TIMEOUT_S = 90
# Real-model workflows whose every model file has download metadata on its loader.
DOWNLOADABLE = [REPO / "workflows" / name for name in ("flux_dev_t2i_duca.json", "wan21_t2v_duca.json")]
DOWNLOAD_HOSTS = re.compile(r"^https?://(huggingface\.co|civitai\.com)/")   # the hosts of their download URLs
SUMMARY = re.compile(r"DuCa\[(\w+)\] (\d+\.\d+)x work \((\d+) steps: (\d+) full, (\d+) aggressive, (\d+) conservative\)")

# Loads a workflow file as dropping it on the page or opening it does, then reports what the
# frontend made of it.
LOAD_JS = """async ([text, name]) => {
    const stores = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s;
    const visible = el => el !== null && el.checkVisibility();
    const toasts = () => [...document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn')]
        .filter(visible).map(t => t.innerText);
    const toastsBefore = new Set(toasts());
    await app.handleFile(new File([text], name, {type: 'application/json'}));
    await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
    const workflow = JSON.parse(text);
    const missing = stores.get('missingNodesError');
    const overlay = document.querySelector('[data-testid=error-overlay]');
    return {
        unregistered: [...new Set(workflow.nodes.map(n => n.type))].filter(t => !(t in LiteGraph.registered_node_types)),
        missingStore: missing !== undefined && 'missingNodesError' in missing,
        missingNodes: (missing?.missingNodesError?.nodeTypes ?? []).map(t => typeof t === 'string' ? t : t.type),
        overlay: visible(overlay) ? overlay.innerText : null,
        dialogs: [...document.querySelectorAll('.p-dialog')].filter(visible).map(d => d.innerText.slice(0, 600)),
        toasts: toasts().filter(t => !toastsBefore.has(t)),
        active: app.extensionManager?.workflow?.activeWorkflow?.filename ?? null,
        nodes: app.rootGraph.serialize().nodes.map(n => ({id: n.id, type: n.type, widgets_values: n.widgets_values ?? []})),
    };
}"""

# Puts the DuCa Cache node at scale 1 near the top left of the canvas and returns the page
# coordinates of the middle of each of its widgets.
WIDGET_POINTS_JS = """() => {
    const node = app.rootGraph.nodes.find(n => n.type === 'DuCaCache');
    const canvas = app.canvas;
    canvas.ds.scale = 1;
    canvas.ds.offset = [120 - node.pos[0], 160 - node.pos[1]];
    canvas.setDirty(true, true);
    canvas.draw(true, true);
    const rect = canvas.canvas.getBoundingClientRect();
    const ratio = rect.width / canvas.canvas.width;
    const points = {};
    for (const widget of node.widgets) {
        const height = widget.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT;
        const [x, y] = canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2, node.pos[1] + widget.y + height / 2]);
        const point = [rect.left + x * ratio, rect.top + y * ratio];
        const hit = document.elementFromPoint(...point);
        points[widget.name] = {point, onCanvas: hit === canvas.canvas};
    }
    return points;
}"""

# The rows of the Missing Models card in the Errors tab of the right side panel (frontend
# 1.47: MissingModelCard / MissingModelRow): the file name (its label's title), the line under it
# ("folder" or "folder · size"), the row's text, whether it offers a download.
MISSING_MODEL_ROWS_JS = """() => [...document.querySelectorAll('[data-testid=missing-model-importable-rows] > div')]
    .filter(row => row.checkVisibility()).map(row => ({
        name: row.querySelector('[title]')?.title ?? null,
        detail: row.querySelector('span.block')?.innerText ?? null,
        lines: row.innerText.split('\\n').map(line => line.trim()).filter(Boolean),
        download: row.querySelector('[data-testid=missing-model-download]') !== null,
    }))"""

# Fits the whole graph, at scale 1 at most, into a page rectangle `width` wide and at most
# `height` high whose top left corner is at (left, top), with `margin` around it; returns the
# scale and the rectangle the graph takes, margins included.
FIT_GRAPH_JS = """([left, top, width, height, margin]) => {
    const canvas = app.canvas;
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const node of app.rootGraph.nodes) {
        const [x, y, w, h] = node.boundingRect;
        [x0, y0, x1, y1] = [Math.min(x0, x), Math.min(y0, y), Math.max(x1, x + w), Math.max(y1, y + h)];
    }
    y0 -= 20;   // the badges over the titles
    const rect = canvas.canvas.getBoundingClientRect();
    const unit = canvas.canvas.width / rect.width / devicePixelRatio;   // canvas units per page pixel
    const scale = Math.min(1, (width - 2 * margin) / (x1 - x0), (height - 2 * margin) / (y1 - y0));
    canvas.ds.scale = scale;
    canvas.ds.offset = [(left - rect.left + margin) * unit / scale - x0, (top - rect.top + margin) * unit / scale - y0];
    canvas.setDirty(true, true);
    canvas.draw(true, true);
    return {scale, clip: [left, top, width, Math.ceil((y1 - y0) * scale + 2 * margin)]};
}"""

PROGRESS_TEXT_JS = """() => {
    const node = app.rootGraph.nodes.find(n => n.type === 'DuCaCache');
    return node.widgets?.find(w => w.name === '$$node-text-preview')?.value ?? null;
}"""


# --------------------------------------------------------------------------- browser and server


def _chromium() -> tuple[str | None, str | None]:
    """(the Chromium binary to drive, None), or (None, why there is none)."""
    named = os.environ.get("DTC_CHROMIUM")
    if named:
        if Path(named).is_file() and os.access(named, os.X_OK):
            return named, None
        return None, f"DTC_CHROMIUM={named} is not an executable file"
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found, None
    return None, (f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)} on PATH): run scripts/setup_env.sh "
                  "(as root with apt-get it installs Debian's chromium) or set DTC_CHROMIUM")


@pytest.fixture(scope="module")
def chromium():
    """(browser, None) once Chromium has started, or (None, why it did not)."""
    try:
        from playwright.sync_api import Error as PlaywrightError, sync_playwright
    except ImportError as err:
        yield None, f"playwright is not installed in this Python ({err}); requirements-dev.txt pins it: run scripts/setup_env.sh"
        return
    executable, why = _chromium()
    if executable is None:
        yield None, why
        return
    try:
        playwright = sync_playwright().start()
    except Exception as err:   # its driver (node, shipped in the wheel) did not run
        yield None, f"Playwright did not start: {err}"
        return
    try:
        try:   # headless as root: no sandbox
            browser = playwright.chromium.launch(executable_path=executable, headless=True, timeout=UI_TIMEOUT_MS,
                                                 args=["--no-sandbox", "--disable-dev-shm-usage"])
        except PlaywrightError as err:
            yield None, f"Chromium {executable} did not start: {err.message}"
            return
        try:
            yield browser, None
        finally:
            browser.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_ui_server")
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            folder = LOADER_FOLDERS.get(node["type"])
            for value in node.get("widgets_values") or []:
                if folder and wt.is_model_file(value):
                    (base / "models" / folder).mkdir(parents=True, exist_ok=True)
                    (base / "models" / folder / value).touch()
    _write_input_images(base / "input")
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    with start_server(base, comfyui=COMFYUI) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(chromium, request):
    """The ComfyUI page, loaded and ready (its node definitions registered)."""
    browser, why = chromium
    if browser is None:
        pytest.fail(why, pytrace=False)
    ui_server = request.getfixturevalue("ui_server")   # started once a browser is there to use it
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    CONSOLE_ERRORS.clear()
    page.on("pageerror", lambda err: CONSOLE_ERRORS.append(f"uncaught: {err}"))
    page.on("console", lambda msg: msg.type == "error" and not msg.text.startswith("Failed to load resource")
            and CONSOLE_ERRORS.append(msg.text[:300]))   # offline: no templates, no registry
    started = time.monotonic()
    page.goto(ui_server.url)
    page.wait_for_function("window.app?.rootGraph !== undefined && window.LiteGraph !== undefined"
                           " && 'DuCaCache' in LiteGraph.registered_node_types")
    print(f"frontend {page.evaluate('window.__COMFYUI_FRONTEND_VERSION__')} ready in {time.monotonic() - started:.1f} s")
    yield page
    context.close()


@pytest.fixture(scope="module")
def object_info(ui_server):
    return wt.load_object_info(ui_server.url)


def _load(page, path: Path, text: str | None = None) -> dict:
    return page.evaluate(LOAD_JS, [path.read_text() if text is None else text, path.name])


def _load_problems(path: Path, loaded: dict) -> list[str]:
    """What went wrong loading `path`, as the frontend reported it."""
    problems = []
    if not loaded["missingStore"]:
        problems.append("the frontend has no missingNodesError store: this test needs updating for it")
    if loaded["unregistered"]:
        problems.append(f"node types not registered in LiteGraph: {loaded['unregistered']}")
    if loaded["missingNodes"]:
        problems.append(f"the frontend reports missing nodes: {loaded['missingNodes']}")
    if loaded["overlay"]:
        problems.append(f"error overlay: {loaded['overlay']!r}")
    problems += [f"dialog: {text!r}" for text in loaded["dialogs"]]
    problems += [f"toast: {text!r}" for text in loaded["toasts"]]
    if not re.fullmatch(re.escape(path.stem) + r"( \(\d+\))?", loaded["active"] or ""):   # "name (2)" when open twice
        problems.append(f"the open workflow is {loaded['active']!r}, not {path.stem!r}")
    saved = {node["id"]: (node["type"], node.get("widgets_values") or []) for node in json.loads(path.read_text())["nodes"]}
    shown = {node["id"]: (node["type"], node["widgets_values"]) for node in loaded["nodes"]}
    if saved != shown:
        problems += [f"node {nid}: {saved.get(nid)} in the file, {shown.get(nid)} in the page"
                     for nid in sorted(set(saved) | set(shown), key=str) if saved.get(nid) != shown.get(nid)]
    return problems


# --------------------------------------------------------------------------- tests


def test_chromium_starts(chromium):
    browser, why = chromium
    assert browser is not None, why
    print(f"Chromium {browser.version}")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_without_missing_nodes(path, page):
    loaded = _load(page, path)
    problems = _load_problems(path, loaded)
    assert not problems, f"{path.name} in the browser:\n  " + "\n  ".join(problems) + (
        "\nconsole errors:\n  " + "\n  ".join(CONSOLE_ERRORS[-10:]))


def test_an_unknown_node_type_is_caught(page):
    """The checks above see a missing node: the frontend reports it as a user would see it."""
    text = REFERENCE.read_text().replace('"DuCaCache"', '"NoSuchNodeType"')
    loaded = _load(page, REFERENCE, text)
    assert loaded["unregistered"] == ["NoSuchNodeType"], loaded["unregistered"]
    assert loaded["missingNodes"] == ["NoSuchNodeType"], loaded["missingNodes"]
    assert loaded["overlay"] and "NoSuchNodeType" in loaded["overlay"], loaded["overlay"]
    assert any("missing nodes" in p for p in _load_problems(REFERENCE, loaded))
    assert _load_problems(REFERENCE, _load(page, REFERENCE)) == []   # and a good file clears it


def _loaded_models(path: Path) -> dict[str, tuple[str, dict | None]]:
    """File name -> (the models folder its loader looks in, its entry in the loader's properties.models or None)."""
    models = {}
    for node in json.loads(path.read_text())["nodes"]:
        folder = LOADER_FOLDERS.get(node["type"])
        if folder is None:
            continue
        metadata = {entry.get("name"): entry for entry in (node.get("properties") or {}).get("models") or []}
        for value in node.get("widgets_values") or []:
            if wt.is_model_file(value):
                models[value] = (folder, metadata.get(value))
    return models


@pytest.mark.parametrize("path", DOWNLOADABLE, ids=lambda p: p.stem)
def test_missing_models_are_offered_for_download(path, page, ui_server):
    """Opened while none of its model files is in the models folders, the workflow makes the frontend
    list each one in its Errors panel, under the folder its loader reads, with a Download button that
    opens the URL the loader's download metadata gives (ComfyUI's missing-model pipeline, which reads
    node properties.models; the stand-in files are moved away for the test and put back after)."""
    from playwright.sync_api import expect

    expected = _loaded_models(path)
    assert expected, f"{path.name} loads no model file"
    stand_ins = [ui_server.models_dir / folder / name for name, (folder, _) in expected.items()]
    hidden = ui_server.models_dir.parent / "hidden_models"
    hidden.mkdir(exist_ok=True)
    context = page.context
    requested = []   # what the page asked of the download hosts: (method, url)

    def download_host(route):
        requested.append((route.request.method, route.request.url))
        route.fulfill(status=200, body="")   # offline: the files' size (HEAD) and the download's page

    context.route(DOWNLOAD_HOSTS, download_host)
    try:
        for file in stand_ins:
            file.rename(hidden / file.name)
        page.evaluate("() => app.reloadNodeDefs()")   # as Refresh Node Definitions does: the combos lose the files
        _load(page, path)
        expect(page.get_by_test_id("error-overlay"), "the error overlay").to_be_visible(timeout=10_000)
        page.get_by_test_id("error-overlay-see-errors").click()   # "View details": the Errors tab
        page.wait_for_function(f"({MISSING_MODEL_ROWS_JS})().length >= {len(expected)}", timeout=10_000)
        rows = page.evaluate(MISSING_MODEL_ROWS_JS)
        shown = {}
        for row in rows:
            url = None
            if row["download"]:
                with context.expect_page(timeout=10_000) as opened:
                    page.get_by_role("button", name=f"Download {row['name']}", exact=True).click()
                tab = opened.value
                tab.wait_for_load_state("domcontentloaded")
                url = tab.url
                tab.close()
            shown[row["name"]] = ((row["detail"] or "").split(" · ")[0] or None, url)
        want = {name: (folder, (entry or {}).get("url")) for name, (folder, entry) in expected.items()}
        problems = [f"{name}: (folder, download URL) {shown.get(name)} in the panel, {want[name]} in the workflow"
                    for name in want if shown.get(name) != want[name]]
        problems += [f"{name}: listed as missing, but the workflow does not load it" for name in set(shown) - set(want)]
        problems += [f"{name}: no download URL for it in the properties.models of its {folder} loader"
                     for name, (folder, entry) in expected.items() if not (entry or {}).get("url")]
        problems += [f"{name}: properties.models gives folder {entry['directory']!r}, its loader reads {folder!r}"
                     for name, (folder, entry) in expected.items() if entry and entry.get("directory") != folder]
        assert not problems, f"{path.name}, its missing models in the page:\n  " + "\n  ".join(problems) + (
            f"\nrows: {rows}")
        downloads = {url for method, url in requested if method == "GET"}
        assert downloads == {url for _, url in want.values()}, f"downloads requested: {downloads}"
    finally:
        for file in stand_ins:
            if (hidden / file.name).exists():
                (hidden / file.name).rename(file)
        context.unroute(DOWNLOAD_HOSTS, download_host)
        page.evaluate("""async () => {
            const stores = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s;
            stores.get('rightSidePanel')?.closePanel();
            await app.reloadNodeDefs();
        }""")
    assert _load_problems(REFERENCE, _load(page, REFERENCE)) == []   # files back: a good file clears it


def test_duca_widgets_show_their_tooltips(page, object_info):
    from playwright.sync_api import expect

    assert _load_problems(REFERENCE, _load(page, REFERENCE)) == []
    required = object_info["DuCaCache"]["input"]["required"]
    expected = {name: spec[1]["tooltip"] for name, spec in required.items()
                if name in {w.name for w in wt.widget_specs(object_info["DuCaCache"])}}
    assert len(expected) == len(wt.widget_specs(object_info["DuCaCache"])), "a widget has no tooltip in /object_info"
    points = page.evaluate(WIDGET_POINTS_JS)
    assert set(expected) <= set(points), f"widgets in /object_info but not on the node: {set(expected) - set(points)}"
    tooltip = page.locator(".node-tooltip")
    for name, text in expected.items():
        where = points[name]
        assert where["onCanvas"], f"widget {name} at {where['point']} is covered by another element"
        page.mouse.move(*where["point"])
        expect(tooltip, f"tooltip of widget {name}").to_have_text(text, timeout=5000)
        page.mouse.move(5, 5)   # off the canvas: the tooltip goes
        expect(tooltip).to_be_hidden(timeout=5000)


def test_reference_workflow_runs_from_the_run_button(page, ui_server):
    from playwright.sync_api import expect

    assert _load_problems(REFERENCE, _load(page, REFERENCE)) == []
    steps = next(n for n in json.loads(REFERENCE.read_text())["nodes"] if n["type"] == "KSampler")["widgets_values"][2]
    log_start = len(ui_server.log())
    started = time.monotonic()
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as response:
        page.get_by_test_id("queue-button").click()
    assert response.value.ok, f"/prompt refused the workflow: {response.value.text()[:4000]}"
    prompt_id = response.value.json()["prompt_id"]
    entry, log = ui_server.wait_for(prompt_id, RUN_TIMEOUT_S, log_start)
    assert entry["status"]["status_str"] == "success", (
        f"{json.dumps(execution_errors(entry), indent=1)[:6000]}\n{log[-4000:]}")
    print(f"queued from the page, finished in {time.monotonic() - started:.1f} s")

    # The run summary arrives on the node after the run (progress_text over the websocket).
    page.wait_for_function(f"({PROGRESS_TEXT_JS})() !== null", timeout=10_000)
    text = page.evaluate(PROGRESS_TEXT_JS)
    match = SUMMARY.search(text)
    assert match, f"the DuCa node shows {text!r}, not a run summary"
    mode, _, shown_steps, *_ = match.groups()
    assert (mode, int(shown_steps)) == ("duca", steps), text
    expect(page.get_by_text(text, exact=True)).to_be_visible()
    if os.environ.get("DTC_SCREENSHOT"):   # the README's picture: DTC_SCREENSHOT=docs/node_in_graph.png
        _save_graph_screenshot(page, Path(os.environ["DTC_SCREENSHOT"]))


def _save_graph_screenshot(page, path: Path, area=(100, 120, 1400, 800)):
    """The graph as it is in the page, fitted into `area` (left, top, width, height: away from the
    side bar, the tabs, the Run bar and the zoom buttons) and cropped to it, saved as a PNG at `path`."""
    page.evaluate("""async () => {
        await app.extensionManager.setting.set('Comfy.Minimap.Visible', false);
        const stores = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s;
        stores.get('rightSidePanel')?.closePanel();
    }""")
    page.mouse.move(5, 5)   # no hover, no tooltip
    fitted = page.evaluate(FIT_GRAPH_JS, [*area, 24])
    page.wait_for_timeout(500)   # the DOM widgets and the output image follow the canvas
    page.evaluate("() => app.canvas.draw(true, true)")
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), clip=dict(zip(("x", "y", "width", "height"), fitted["clip"])))
    print(f"graph at scale {fitted['scale']:.2f}, {fitted['clip'][2]}x{fitted['clip'][3]}, saved to {path}"
          f" ({path.stat().st_size // 1024} KB)")
