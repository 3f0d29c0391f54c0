"""The Streamlit app as a user runs it: `streamlit run megatron_lite/app/chat_app.py -- --load CKPT` from the
repository root, opened in headless Chromium (Debian's `chromium` + `chromium-driver`, `selenium`).
The browser test is skipped where those are absent; the server-side check runs everywhere."""
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from inference_utils import make_checkpoint
from megatron_lite.inference.chat import chat
from megatron_lite.inference.loading import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt, _, _ = make_checkpoint(tmp_path_factory.mktemp("app") / "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "megatron_lite/app/chat_app.py", "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port), "--", "--load", str(ckpt),
         "--no-compile"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    log = []
    deadline = time.monotonic() + 120
    while not any("URL:" in line for line in log):
        assert proc.poll() is None and time.monotonic() < deadline, "streamlit did not start:\n" + "".join(log)
        try:
            log.append(lines.get(timeout=1))
        except queue.Empty:
            pass
    yield f"http://127.0.0.1:{port}", ckpt, log
    proc.kill()  # nothing to save: a graceful stop only costs test time
    proc.wait(timeout=30)


def test_usage_statistics_off(server):
    """The repo's .streamlit/config.toml is read when started from the root: Streamlit says it collects
    usage statistics unless that option is set in a config file."""
    _, _, log = server
    assert not any("usage statistics" in line for line in log), "".join(log)


@pytest.fixture()
def browser():
    if not (CHROMEDRIVER and CHROMIUM):
        pytest.skip("needs chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # to see every request the page makes
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def visible(text: str) -> str:
    """The reply as a page shows it, compared without whitespace and Markdown syntax (the reply is Markdown)."""
    return re.sub(r"[\s*_`#>~\[\]()\\|+-]", "", text)


def test_browser_chat_round_trip(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, ckpt, _ = server
    d, wait = browser, WebDriverWait(browser, 120)

    def find(css):
        return d.find_elements(By.CSS_SELECTOR, css)

    d.get(url)  # the server loads the model meanwhile
    message = "# Hello world"
    model, tok = load_model(ckpt)
    conv = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": message}]
    expected = visible(chat(model, tok, [conv], max_new_tokens=64, greedy=True)[0].text)
    assert expected
    wait.until(lambda _: find("[data-testid=stChatInputTextArea]"))
    assert [h.text for h in find("h1")] == ["megatron_lite chat"]
    (caption,) = find("[data-testid=stMainBlockContainer] [data-testid=stCaptionContainer]")
    assert caption.text.startswith("ckpt · dense · ") and "context 128" in caption.text
    # Above the fold: the caption and the first-page hint are inside the first screen.
    fold = d.execute_script("return window.innerHeight")
    (hint,) = find("[data-testid=stMainBlockContainer] [data-testid=stAlert]")
    assert "Type a message" in hint.text
    for el in (caption, hint):
        assert el.is_displayed() and el.rect["y"] + el.rect["height"] <= fold
    # "Max new tokens" ends inside the model's 128-token context.
    slider = "[data-testid=stSidebar] [data-testid=stSlider]"
    max_new, temperature = find(slider)[:2]
    ticks = max_new.find_elements(By.CSS_SELECTOR, "[data-testid=stSliderTickBar] p")  # shown on hover
    assert [t.get_attribute("textContent") for t in ticks] == ["1", "127"]
    assert max_new.find_element(By.CSS_SELECTOR, "input[type=range]").get_attribute("max") == "127"

    # Greedy (temperature slider to its minimum, 0), then one message with Markdown syntax in it.
    d.execute_script("arguments[0].focus()", temperature.find_element(By.CSS_SELECTOR, "input[type=range]"))
    ActionChains(d).send_keys(Keys.HOME).perform()
    wait.until(lambda _: find(slider + " input[type=range]")[1].get_attribute("value") == "0")
    wait.until(lambda _: not find("[data-testid=stStatusWidget]"))  # that rerun has finished
    box = find("[data-testid=stChatInputTextArea]")[0]
    box.send_keys(message)
    box.send_keys(Keys.ENTER)

    def reply():
        msgs = find("[data-testid=stChatMessageContent]")
        return visible(msgs[1].text) if len(msgs) == 2 else None

    try:
        wait.until(lambda _: reply() == expected)
    except TimeoutException:
        pass
    assert reply() == expected
    user = find("[data-testid=stChatMessageContent]")[0]
    assert user.text == message and not user.find_elements(By.CSS_SELECTOR, "h1")  # shown as typed
    assert not find("[data-testid=stMainBlockContainer] [data-testid=stAlert]")  # the hint is gone

    # Nothing left the machine: no request to Streamlit's metrics host (or anywhere but the app).
    urls = {json.loads(e["message"])["message"].get("params", {}).get("request", {}).get("url", "")
            for e in d.get_log("performance")}
    assert {u for u in urls if u and not u.startswith((url, "data:", "blob:"))} == set()
