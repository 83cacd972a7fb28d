"""The web page at `/` of `vlbridge serve`, driven in a real headless Chromium (Selenium and the system
chromedriver): pick a rendered ShapesWorld scene, ask, and the streamed answer in the page equals the
server's plain answer to the same request; a request the server refuses shows its error message; on a
server with --index, the search box shows the images /v1/retrieve ranks first."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from selenium import webdriver  # noqa: E402  (the dev extra; only a missing browser skips)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_interface import _create  # noqa: E402
from test_serving import data_url, free_port  # noqa: E402

import vlbridge  # noqa: E402
from vlbridge.data import shapesworld  # noqa: E402
from vlbridge.serving import create_app  # noqa: E402

QUESTION = "what color is the circle?"


def _browser_paths() -> tuple[str, str]:
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        missing = ", ".join(name for name, p in (("chromium", chromium), ("chromedriver", driver)) if not p)
        pytest.skip(f"no headless browser: {missing} not found (apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture(scope="module")
def serve(tiny_configs, build, tmp_path_factory):
    """serve(**create_app_kwargs) -> the base URL of a tiny saved BLIP-2 served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("page")
    model, processor = _create("blip2", tiny_configs, build)
    model.save_pretrained(root / "blip2", processor=processor)
    running = []

    def _serve(**kwargs) -> str:
        served, served_processor = vlbridge.load(root / "blip2", device="cpu")
        port = free_port()
        app = create_app(served, served_processor, "blip2-tiny", **kwargs)
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        running.append((srv, thread))
        deadline = time.time() + 30
        while not srv.started and time.time() < deadline:
            time.sleep(0.02)
        assert srv.started
        return f"http://127.0.0.1:{port}"

    yield _serve
    for srv, thread in running:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(serve):
    return serve()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = _browser_paths()
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,800",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)  # no driver download: the system one
    yield chrome
    chrome.quit()


def _ask(browser, base: str, image_path, question: str, max_tokens: int, load: bool = True) -> str:
    """Load the page (unless load=False), choose the image, ask, and return the final status state
    ('done' or 'error')."""
    wait = WebDriverWait(browser, 120)
    if load:
        browser.get(base + "/")
        wait.until(lambda b: b.find_element(By.ID, "model").text == "blip2-tiny")
    browser.find_element(By.ID, "file").send_keys(str(image_path))
    wait.until(lambda b: b.find_element(By.ID, "preview").is_displayed())
    browser.find_element(By.ID, "question").send_keys(question)
    for field, value in (("max-tokens", max_tokens), ("temperature", 0)):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    browser.find_element(By.ID, "submit").click()
    status = browser.find_element(By.ID, "status")
    wait.until(lambda b: status.get_attribute("data-state") in ("done", "error"))
    return status.get_attribute("data-state")


def test_page_streams_the_api_answer(server, browser, tmp_path):
    assert "<title>vlbridge</title>" in httpx.get(server + "/").text
    assert httpx.get(server + "/static/page.js").status_code == 200
    image = shapesworld.render(shapesworld.make_split("test", 1)[0])
    path = tmp_path / "scene.png"
    image.save(path)

    assert _ask(browser, server, path, QUESTION, max_tokens=12) == "done", browser.find_element(By.ID, "error").text
    shown = browser.find_element(By.ID, "answer").text
    content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    body = {"model": "blip2-tiny", "messages": [{"role": "user", "content": content}], "temperature": 0}
    r = httpx.post(server + "/v1/chat/completions", json={**body, "max_tokens": 12}, timeout=60)
    expected = r.json()["choices"][0]["message"]["content"]
    assert expected and shown == expected.strip()  # the DOM's text: innerText, trimmed by Selenium
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert not browser.find_element(By.ID, "search").is_displayed()  # no --index: no search box
    browser.save_screenshot(str(tmp_path / "page-1000px.png"))

    browser.set_window_size(420, 900)  # a narrow window: one column, nothing cut off
    try:
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= browser.execute_script("return window.innerWidth")
        browser.save_screenshot(str(tmp_path / "page-420px.png"))
    finally:
        browser.set_window_size(1000, 800)


def test_page_shows_server_errors(server, browser, tmp_path):
    path = tmp_path / "scene.png"
    shapesworld.render(shapesworld.make_split("test", 1)[0]).save(path)
    assert _ask(browser, server, path, "why " * 300, max_tokens=4) == "error"
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.text.startswith("400: ") and "positions" in error.text
    assert browser.find_element(By.ID, "answer").text == ""
    browser.save_screenshot(str(tmp_path / "page-error.png"))


def test_page_with_an_api_key(serve, browser, tmp_path):
    base = serve(api_key="secret")
    browser.get(base + "/")
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30).until(lambda b: error.is_displayed())
    assert error.text.startswith("Could not list the served model: 401: ")
    browser.find_element(By.ID, "api-key").send_keys("secret\t")  # the change event lists the model again
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text == "blip2-tiny")
    path = tmp_path / "scene.png"
    shapesworld.render(shapesworld.make_split("test", 1)[0]).save(path)
    assert _ask(browser, base, path, QUESTION, max_tokens=3, load=False) == "done", error.text
    assert browser.find_element(By.ID, "answer").text


@pytest.fixture(scope="module")
def indexed(tiny_configs, build, tmp_path_factory):
    """The base URL of a tiny stage-1 BLIP-2 (retrieval heads) serving a folder of ShapesWorld scenes."""
    root = tmp_path_factory.mktemp("page_index")
    model, processor = _create("blip2_stage1", tiny_configs, build)
    model.save_pretrained(root / "model", processor=processor)
    (root / "scenes").mkdir()
    for i, scene in enumerate(shapesworld.make_split("test", 6)):
        shapesworld.render(scene).save(root / "scenes" / f"scene{i}.png")
    served, served_processor = vlbridge.load(root / "model", device="cpu")
    app = create_app(served, served_processor, "blip2-stage1", index=root / "scenes", index_cache=root / "cache")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_page_searches_the_index(indexed, browser, tmp_path):
    wait = WebDriverWait(browser, 60)
    browser.get(indexed + "/")
    search = browser.find_element(By.ID, "search")
    wait.until(lambda b: search.is_displayed())
    assert browser.find_element(By.ID, "index-size").text == "(6 images)"
    box = browser.find_element(By.ID, "top-k")
    box.clear()
    box.send_keys("3")
    browser.find_element(By.ID, "query").send_keys("a small red circle")
    browser.find_element(By.ID, "search-submit").click()
    status = browser.find_element(By.ID, "search-status")
    wait.until(lambda b: status.get_attribute("data-state") in ("done", "error"))
    assert status.get_attribute("data-state") == "done", browser.find_element(By.ID, "search-error").text
    shown = browser.find_elements(By.CSS_SELECTOR, "#results img")
    hits = httpx.post(indexed + "/v1/retrieve", json={"query": "a small red circle", "top_k": 3}).json()["data"]
    assert [img.get_attribute("alt") for img in shown] == [h["name"] for h in hits]
    # every image decoded in the page, drawn at a visible size
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in shown)
    assert all(img.size["width"] > 50 for img in shown)
    browser.save_screenshot(str(tmp_path / "page-search.png"))
