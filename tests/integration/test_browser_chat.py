"""The chat page in a real headless browser (Debian's Chromium, driven by selenium),
through Envoy's public port with gRPC-Web: a key pasted in, a session created, documents
uploaded into its collection, an answer
shown token by token before its turn ends, its sources opened, a turn in progress (a
sandboxed code step) resumed after a reload, a cancel, and a page of another origin
refused by CORS. A screenshot of the page goes to
bench/results/chat-page.png."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from switchboard.chat.v1 import chat_pb2 as pb
from switchboard.chat.v1 import chat_service_pb2_grpc
from switchboard.rag.v1 import rag_pb2, rag_service_pb2_grpc

from services.demo import handbook
from tests.integration.test_converse import COLLECTION, QUESTION

SCREENSHOT = Path(__file__).resolve().parents[2] / "bench" / "results" / "chat-page.png"
WAIT = 90
SLOW_CODE = "/code\nimport time\ntime.sleep(8)\nprint('slept well')"
"""A turn that lasts a few seconds: the demo models answer in well under one."""
GENERATING = ".msg.assistant[data-state='generating']"

pytestmark = [
    pytest.mark.skipif(
        not (shutil.which("chromium") and shutil.which("chromedriver")),
        reason="needs Debian's chromium and chromium-driver: make chromium",
    ),
    pytest.mark.timeout(600),  # three long answers, a browser, and the mesh if first
]


@pytest.fixture(scope="module")
def tenant() -> str:
    return f"browser-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def key(credentials, tenant) -> str:
    return credentials.key(tenant)


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> list[Path]:
    """The first handbook documents as files to upload, each named by its document id."""
    folder = tmp_path_factory.mktemp("handbook")
    paths = []
    for request in handbook(COLLECTION, 6):
        path = folder / request.document.document_id
        path.write_text(request.document.text)
        paths.append(path)
    return paths


@pytest.fixture
async def chat(envoy_target):
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        yield chat_service_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = Options()
    options.binary_location = shutil.which("chromium") or ""
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-dev-shm-usage",
        "--window-size=1280,860",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def wait(browser: WebDriver, check, what: str, timeout: float = WAIT):
    """Polls `check` (a page being redrawn may drop an element between two reads)."""
    waiting = WebDriverWait(
        browser, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    )
    try:
        return waiting.until(check)
    except TimeoutException:
        status = browser.find_element(By.ID, "status").text
        shown = [m.get_attribute("outerHTML")[:300] for m in answers(browser)]
        raise AssertionError(f"not true within {timeout} s: {what}; {status!r} {shown}") from None


def answers(browser: WebDriver) -> list:
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def tool_progress(browser: WebDriver) -> str:
    """The code step's lines in the answer being generated ("" when none is)."""
    tools = browser.find_elements(By.CSS_SELECTOR, f"{GENERATING} .tool")
    return tools[-1].text if tools else ""


WATCH_TOKENS = """
window.firstToken = null; window.turnEnded = null;
new MutationObserver(() => {
  const live = document.querySelector("#messages .msg.assistant[data-state='generating'] .text");
  if (live && live.textContent && window.firstToken === null) window.firstToken = performance.now();
  const done = document.querySelector("#messages .msg.assistant[data-state='completed']");
  if (done && window.turnEnded === null) window.turnEnded = performance.now();
}).observe(document.getElementById("messages"),
  {subtree: true, childList: true, characterData: true, attributes: true});
"""
"""Records, in the page, when the answer first shows text while it is still generating,
and when a turn is first shown completed."""


def ask(browser: WebDriver, text: str) -> None:
    before = len(answers(browser))
    box = browser.find_element(By.ID, "text")
    first, *more = text.split("\n")
    box.send_keys(first)  # typed (Enter would send it): the other lines are pasted
    browser.execute_script(
        "arguments[0].value += arguments[1]", box, "".join(f"\n{m}" for m in more)
    )
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: len(answers(d)) > before, "the answer's bubble appears")


def open_session(browser: WebDriver, session_id: str) -> None:
    item = f"#sessions li[data-session-id='{session_id}']"
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, item), "the session is listed")
    browser.find_element(By.CSS_SELECTOR, item).click()
    wait(browser, lambda d: "live" in d.find_element(By.ID, "status").text, "the stream is live")


async def stored(chat, metadata, session_id: str) -> list[pb.Message]:
    reply = await chat.ListMessages(
        pb.ListMessagesRequest(session_id=session_id), metadata=metadata, timeout=30
    )
    return list(reply.messages)


async def test_a_whole_chat_session_in_the_browser(
    browser, envoy_target, key, tenant, documents, chat, credentials
):
    page = f"http://{envoy_target}/"
    browser.get(page)
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.ID, "connect").click()
    wait(browser, lambda d: "key accepted" in d.find_element(By.ID, "status").text, "key taken")

    # a session made on the page, a question, its answer with sources to open
    browser.find_element(By.ID, "title").send_keys("Handbook questions")
    browser.find_element(By.ID, "collection").send_keys(COLLECTION)
    browser.find_element(By.ID, "create").click()
    wait(browser, lambda d: "live" in d.find_element(By.ID, "status").text, "the stream is live")
    # the documents uploaded from the page into the session's collection
    browser.find_element(By.ID, "files").send_keys("\n".join(map(str, documents)))
    browser.find_element(By.ID, "upload-button").click()
    uploaded = f"{len(documents)} document(s) in {COLLECTION}"
    wait(browser, lambda d: uploaded in d.find_element(By.ID, "status").text, "uploaded")
    async with grpc.aio.insecure_channel(envoy_target) as channel:
        listed = await rag_service_pb2_grpc.RagServiceStub(channel).ListCollections(
            rag_pb2.ListCollectionsRequest(), metadata=credentials.metadata(tenant), timeout=30
        )
    assert [(c.name, c.document_count) for c in listed.collections] == [
        (COLLECTION, len(documents))
    ]
    browser.execute_script(WATCH_TOKENS)
    ask(browser, QUESTION)
    done = ".msg.assistant[data-state='completed']"
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"{done} .sources a"), "sources")
    first, ended = browser.execute_script("return [window.firstToken, window.turnEnded]")
    assert first is not None and ended is not None and first < ended, (first, ended)
    answer = browser.find_element(By.CSS_SELECTOR, f"{done} .text").text
    assert "seven days" in answer or "Tuesday" in answer
    source = browser.find_element(By.CSS_SELECTOR, f"{done} .sources a.source")
    passage = browser.find_element(By.CSS_SELECTOR, f"{done} .sources .passage")
    assert not passage.is_displayed()
    source.click()
    wait(browser, lambda d: passage.is_displayed() and passage.text, "the source's passage opens")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    # a turn that takes a while (a sandboxed code step): its progress shows while it
    # runs, and a reload mid-turn picks it up from its start, then the rest arrives
    metadata = credentials.metadata(tenant)
    slow = await chat.CreateSession(
        pb.CreateSessionRequest(
            title="Code in the sandbox", settings=pb.SessionSettings(code_enabled=True)
        ),
        metadata=metadata,
    )
    sid = slow.session.session_id
    browser.refresh()  # the key and the last session come back from the tab's storage
    open_session(browser, sid)
    ask(browser, SLOW_CODE)
    wait(browser, lambda d: "started" in tool_progress(d), "the code step's progress streams")
    browser.refresh()
    wait(browser, lambda d: "run_code" in tool_progress(d), "the turn resumes after the reload")
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, GENERATING), "it completes")
    history = await stored(chat, metadata, sid)
    assert history[-1].status == pb.MESSAGE_STATUS_COMPLETED and "slept" in history[-1].text
    shown = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].text
    assert shown == history[-1].text.strip()  # nothing lost, nothing twice
    assert "completed" in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .tool")[-1].text
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.tool")  # the call shows once

    # cancel stops the turn in progress, which ends as far as it got
    ask(browser, SLOW_CODE)
    wait(browser, lambda d: "started" in tool_progress(d), "the second code step runs")
    wait(browser, lambda d: d.find_element(By.ID, "cancel").is_enabled(), "cancel is offered")
    browser.find_element(By.ID, "cancel").click()
    cancelled = ".msg.assistant[data-state='cancelled']"
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, cancelled), "the turn is cancelled")
    history = await stored(chat, metadata, sid)
    assert history[-1].status == pb.MESSAGE_STATUS_CANCELLED


FETCH = """
const [url, key, done] = arguments;
fetch(url, {method: "POST", body: new Uint8Array(5), headers: {
  "content-type": "application/grpc-web+proto", "x-grpc-web": "1",
  "authorization": "Bearer " + key}})
  .then((r) => done("answered " + r.status + " " + r.headers.get("content-type")))
  .catch((e) => done("refused " + e.name));
"""


def test_a_page_of_another_origin_is_refused_by_cors(browser, envoy_target, key):
    host, port = envoy_target.rsplit(":", 1)
    assert host == "127.0.0.1"
    call = f"http://127.0.0.1:{port}/switchboard.chat.v1.ChatService/ListSessions"
    browser.get(f"http://127.0.0.1:{port}/")  # the page's own origin: the call goes through
    answer = browser.execute_async_script(FETCH, call, key)
    assert answer == "answered 200 application/grpc-web+proto"
    browser.get(f"http://localhost:{port}/")  # another origin, not configured
    assert browser.execute_async_script(FETCH, call, key) == "refused TypeError"
