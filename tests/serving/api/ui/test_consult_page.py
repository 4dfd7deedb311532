"""The consult page (``skingpt4 serve --ui``, serving/api/ui/static/) in a real browser: Debian's
Chromium (/usr/bin/chromium, from scripts/setup-system.sh) driven by Playwright's Python package,
whose wheel carries its driver, so no browser is downloaded. One server with an API key on the
tiny Llama checkpoint, one browser, a fresh context (empty sessionStorage) per test, all on
loopback.

Each test fails on an uncaught page error, on a Content-Security-Policy violation, and on any
console error other than the browser's own line for a refused request. Refusals the test server
cannot be made to give (413, 503, 429, 500, a dropped connection, a stream that ends on an
error event) and a model answer holding markup are answered by Playwright's request routing.

    .venv/bin/python -m pytest -q tests/serving/api/ui -p no:cacheprovider
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from plugins.skingpt4.template import DEFAULT_QUESTION
from tests.serving.helpers import API_KEY, MAX_IMAGES, start_server

pytestmark = [pytest.mark.engine, pytest.mark.slow]  # a server of its own, and a browser

CHROMIUM = Path("/usr/bin/chromium")
# Root, no network: no sandbox, no GPU, nothing that phones home. Playwright adds --headless
# and a fresh user-data directory of its own, removed when the browser closes.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHAT = "**/v1/chat/completions"
MAX_SIDE_PX = 448  # consult.js shrinks every photo to this longest side
# Each wait: an answer takes well under a second on the tiny model, more on a loaded machine.
expect.set_options(timeout=15_000)
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def ui_server(tiny_checkpoints, tmp_path_factory):
    srv = start_server(tiny_checkpoints["llama"], tmp_path_factory.mktemp("ui-server"), "--ui",
                       "--api-key", API_KEY, "--max-images-per-request", str(MAX_IMAGES))
    yield srv
    srv.process.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs it (scripts/setup-system.sh)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[Path]:
    """Synthetic skin photos as JPEG files: a large one first (shrunk by the page), then
    enough others to pass the server's limit of photos per request."""
    from encoders.samples import encode_image, synthetic_skin_photo

    folder = tmp_path_factory.mktemp("photos")
    sizes = [(1600, 1200), *[(512, 384)] * MAX_IMAGES]
    paths = [folder / f"skin-{i}.jpg" for i in range(len(sizes))]
    for i, (path, size) in enumerate(zip(paths, sizes)):
        path.write_bytes(encode_image(synthetic_skin_photo(seed=i, size=size)))
    return paths


@dataclass
class Watch:
    """What a page did: its chat requests, console errors and uncaught errors."""

    chats: list = field(default_factory=list)  # playwright Request objects, in order
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def chat_body(self, i: int) -> dict:
        return self.chats[i].post_data_json

    def chat_headers(self, i: int) -> dict[str, str]:
        return self.chats[i].all_headers()


# Every CSP violation reaches the console as an error, whatever directive it broke.
REPORT_CSP = ("document.addEventListener('securitypolicyviolation', (e) => console.error("
              "`CSP violation: ${e.violatedDirective} ${e.blockedURI}`));")


@pytest.fixture
def context_options() -> dict:
    """A desktop window; a test parametrized with ``context_options`` gets another device."""
    return {"viewport": {"width": 1280, "height": 800}}


PHONE = {"viewport": {"width": 375, "height": 740}, "device_scale_factor": 2, "is_mobile": True,
         "has_touch": True}


@pytest.fixture
def page(browser, ui_server, context_options):
    context = browser.new_context(**context_options)
    context.add_init_script(REPORT_CSP)
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    watch = Watch()
    pg.on("console", lambda m: m.type == "error" and watch.console_errors.append(m.text))
    pg.on("pageerror", lambda e: watch.page_errors.append(str(e)))
    pg.on("request", lambda r: r.url.endswith("/v1/chat/completions") and watch.chats.append(r))
    pg.watch = watch
    pg.goto(ui_server.base_url + "/")
    yield pg
    context.close()
    assert watch.page_errors == []
    # The browser logs each refused request ("Failed to load resource: ... 401"); nothing else.
    assert [m for m in watch.console_errors if not m.startswith("Failed to load resource")] == []


# ---- what a person does ----

def add_photos(page, paths) -> None:
    """Choose photos (added to those already there) and wait for their thumbnails."""
    before = page.locator("#photos li").count()
    page.set_input_files("#choose-photos", [str(p) for p in paths])
    expect(page.locator("#photos li")).to_have_count(before + len(paths))


def enter_key(page, key: str = API_KEY) -> None:
    page.fill("#api-key", key)


def ask(page, question: str = "") -> None:
    """Ask and wait until the page is ready for the next question."""
    page.fill("#question", question)
    page.click("#send")
    expect(page.locator("#send")).to_be_enabled()


def answers(page) -> list[str]:
    return page.locator(".turn.assistant .text").all_text_contents()


def sse(*events: dict | str) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def delta(text: str) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


def image_size(data_url: str) -> tuple[int, int]:
    from PIL import Image

    head, b64 = data_url.split(",", 1)
    assert head == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


# ---- tests ----

def test_page_loads_clean_with_its_notices_and_labels(page, ui_server):
    response = page.request.get(ui_server.base_url + "/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    expect(page).to_have_title("SkinGPT-4 consult")
    expect(page.locator(".warning")).to_contain_text("Not a diagnosis")
    expect(page.locator(".warning")).to_contain_text("do not replace a doctor")
    expect(page.locator(".privacy")).to_contain_text("Nothing is stored by this server")
    assert page.locator('meta[name="viewport"]').get_attribute("content") == (
        "width=device-width, initial-scale=1")
    expect(page.locator("#turns")).to_have_attribute("aria-live", "polite")
    expect(page.locator("#take-photo")).to_have_attribute("capture", "environment")
    for picker in ("#take-photo", "#choose-photos"):
        expect(page.locator(picker)).to_have_attribute("accept", "image/*")
    expect(page.locator("#question")).to_have_attribute("placeholder", DEFAULT_QUESTION)
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, button')]
        .filter((el) => el.tagName === 'BUTTON' ? !el.textContent.trim()
                        : !el.labels.length && !el.getAttribute('aria-label'))
        .map((el) => el.outerHTML)""")
    assert unlabelled == []
    assert page.locator("[onclick], [onload], [onerror], [onsubmit], [style]").count() == 0
    assert page.watch.console_errors == []  # nothing at all at load, not even a favicon


def test_a_consult_starts_with_a_photo(page):
    ask(page, "What is this?")
    expect(page.locator("#error")).to_have_text(
        "Add a photo of the skin first: the model answers about photos.")
    expect(page.locator("#choose-photos")).to_be_focused()
    assert page.watch.chats == []


def test_without_a_key_the_page_asks_for_one(page, photo_files):
    add_photos(page, photo_files[1:2])
    ask(page)
    expect(page.locator("#error")).to_have_text(
        "This server needs an API key. Enter it in the API key field and ask again.")
    expect(page.locator("#api-key")).to_be_focused()
    expect(page.locator(".turn")).to_have_count(0)  # the question is withdrawn ...
    expect(page.locator("#photos li")).to_have_count(1)  # ... and its photo is back
    enter_key(page, "not-the-key")
    ask(page)
    expect(page.locator("#error")).to_have_text(
        "The server did not accept this API key. Check the key and ask again.")
    assert page.watch.chats == []  # refused at v1/models, before any question left the page


def test_a_consult_streams_and_follows_up_with_the_whole_conversation(page, photo_files):
    enter_key(page)
    add_photos(page, photo_files[:1])
    with page.expect_response(CHAT) as answered:
        ask(page)  # empty: the model's first question
    assert answered.value.headers["content-type"].startswith("text/event-stream")
    first = answers(page)
    assert len(first) == 1 and first[0].strip()
    expect(page.locator(".turn.user .text")).to_have_text([DEFAULT_QUESTION])
    expect(page.locator(".turn.user img")).to_have_count(1)
    expect(page.locator("#photos li")).to_have_count(0)

    body, headers = page.watch.chat_body(0), page.watch.chat_headers(0)
    session = headers["x-session-id"]
    assert UUID.match(session)
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert (body["model"], body["stream"], body["max_tokens"]) == ("skingpt4", True, 256)
    [photo, text] = body["messages"][0]["content"]
    assert text == {"type": "text", "text": DEFAULT_QUESTION}
    assert max(image_size(photo["image_url"]["url"])) == MAX_SIDE_PX  # shrunk from 1600 x 1200

    page.fill("#question", "Is it contagious?")
    page.press("#question", "Enter")
    expect(page.locator(".turn.assistant")).to_have_count(2)
    expect(page.locator("#send")).to_be_enabled()
    body = page.watch.chat_body(1)
    assert page.watch.chat_headers(1)["x-session-id"] == session
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0] == page.watch.chat_body(0)["messages"][0]  # the photo again
    assert body["messages"][1]["content"].strip() == first[0].strip()
    assert body["messages"][2] == {"role": "user", "content": "Is it contagious?"}
    assert all(answer.strip() for answer in answers(page))

    # The key lives in this tab's sessionStorage only.
    assert page.evaluate("sessionStorage.getItem('skingpt4.apiKey')") == API_KEY
    assert page.evaluate("localStorage.length") == 0
    assert page.context.cookies() == []


def test_new_consult_clears_everything_and_starts_a_new_session(page, photo_files):
    enter_key(page)
    add_photos(page, photo_files[1:2])
    ask(page, "What is this spot?")
    expect(page.locator(".turn")).to_have_count(2)
    add_photos(page, photo_files[2:3])
    page.fill("#question", "half-typed")
    page.click("#new-consult")
    expect(page.locator(".turn")).to_have_count(0)
    expect(page.locator("#photos li")).to_have_count(0)
    expect(page.locator("#question")).to_have_value("")
    expect(page.locator("#api-key")).to_have_value(API_KEY)  # the key is not the consult's
    add_photos(page, photo_files[2:3])
    ask(page)
    assert len(page.watch.chat_body(1)["messages"]) == 1
    sessions = {page.watch.chat_headers(i)["x-session-id"] for i in (0, 1)}
    assert len(sessions) == 2


def test_stop_aborts_the_stream(page, photo_files):
    enter_key(page)
    add_photos(page, photo_files[1:2])
    held = []
    page.route(CHAT, lambda route: held.append(route))  # no answer comes
    page.fill("#question", "What is this?")
    with page.expect_request(CHAT):
        page.click("#send")
    expect(page.locator("#status")).to_have_text("SkinGPT-4 is answering…")
    with page.expect_event("requestfailed", lambda r: r.url.endswith("/v1/chat/completions")) as failed:
        page.click("#stop")
    assert failed.value.failure == "net::ERR_ABORTED" and len(held) == 1
    expect(page.locator("#status")).to_have_text("Stopped.")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator(".turn")).to_have_count(0)  # nothing came: the question goes back
    expect(page.locator("#question")).to_have_value("What is this?")
    expect(page.locator("#photos li")).to_have_count(1)
    page.unroute(CHAT)
    ask(page, "What is this?")  # and it can be asked again
    assert answers(page)[0].strip()


def test_new_consult_during_an_answer_stops_it(page, photo_files):
    enter_key(page)
    add_photos(page, photo_files[1:2])
    page.route(CHAT, lambda route: None)  # no answer comes
    with page.expect_request(CHAT):
        page.click("#send")
    with page.expect_event("requestfailed", lambda r: r.url.endswith("/v1/chat/completions")):
        page.click("#new-consult")
    expect(page.locator("#status")).to_have_text("New consult: the previous one is cleared.")
    expect(page.locator(".turn")).to_have_count(0)
    expect(page.locator("#photos li")).to_have_count(0)  # the old consult's photo stays gone
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#error")).to_be_hidden()


def test_too_many_photos_are_refused_in_a_sentence(page, photo_files):
    enter_key(page)
    add_photos(page, photo_files[: MAX_IMAGES + 1])
    ask(page)
    expect(page.locator("#error")).to_have_text(
        f"The server refused the question: the request has {MAX_IMAGES + 1} images; "
        f"the limit is {MAX_IMAGES}.")
    expect(page.locator("#photos li")).to_have_count(MAX_IMAGES + 1)
    page.click(f'button[aria-label="Remove photo {MAX_IMAGES + 1}"]')
    expect(page.locator("#photos li")).to_have_count(MAX_IMAGES)
    ask(page)
    expect(page.locator("#error")).to_be_hidden()
    assert answers(page)[0].strip()


def error_body(message: str, code: str) -> str:
    return json.dumps({"error": {"message": message, "type": "X", "param": None, "code": code}})


REFUSALS = {
    "photo too large": (
        {"status": 413, "body": error_body("image is 9000x9000 pixels; the limit is 25 megapixels",
                                           "image_too_large")},
        "A photo is too large for this server: image is 9000x9000 pixels; the limit is 25 "
        "megapixels. Try a smaller photo."),
    "busy": ({"status": 503, "headers": {"Retry-After": "7"}, "body": error_body("busy", "server_busy")},
             "The server is busy. Ask again in 7 seconds."),
    "rate limited": ({"status": 429, "headers": {"Retry-After": "1"}, "body": error_body("slow down", "r")},
                     "The server is busy. Ask again in 1 second."),
    "unprocessable": ({"status": 422, "body": error_body("the photo could not be fetched.", "x")},
                      "The server refused the question: the photo could not be fetched."),
    "server error": ({"status": 500, "body": error_body("the engine failed", "internal_error")},
                     "The server could not answer (error 500): the engine failed."),
    "not json": ({"status": 502, "body": "<html>Bad gateway</html>"},
                 "The server could not answer (error 502)."),
    "error event": ({"status": 200, "content_type": "text/event-stream",
                     "body": sse({"error": {"message": "the engine stopped", "code": "engine_dead"}},
                                 "[DONE]")},
                    "The answer stopped on a server error: the engine stopped."),
    "network": (None, "The server could not be reached. Check your connection and ask again."),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_plain_sentences(page, photo_files, case):
    response, sentence = REFUSALS[case]
    enter_key(page)
    add_photos(page, photo_files[1:2])
    page.route(CHAT, lambda r: r.abort("connectionfailed") if response is None else r.fulfill(**response))
    ask(page)
    expect(page.locator("#error")).to_have_text(sentence)
    expect(page.locator(".turn")).to_have_count(0)
    expect(page.locator("#photos li")).to_have_count(1)


def test_a_partial_answer_is_kept_when_the_stream_fails(page, photo_files):
    enter_key(page)
    add_photos(page, photo_files[1:2])
    body = sse(delta("A red patch"), {"error": {"message": "the engine stopped"}}, "[DONE]")
    page.route(CHAT, lambda r: r.fulfill(status=200, content_type="text/event-stream", body=body))
    ask(page)
    expect(page.locator("#error")).to_have_text("The answer stopped on a server error: the engine stopped.")
    assert answers(page) == ["A red patch"]
    page.unroute(CHAT)
    ask(page, "And now?")
    assert page.watch.chat_body(1)["messages"][1] == {"role": "assistant", "content": "A red patch"}


def test_the_answer_is_text_never_markup(page, photo_files):
    enter_key(page)
    add_photos(page, photo_files[1:2])
    markup = ['<img src=x onerror="document.title=\'run\'">', "<b>bold</b>", "<script>x()</script>"]
    body = sse(*map(delta, markup), "[DONE]")
    page.route(CHAT, lambda r: r.fulfill(status=200, content_type="text/event-stream", body=body))
    ask(page)
    assert answers(page) == ["".join(markup)]
    text = page.locator(".turn.assistant .text")
    assert text.evaluate("(el) => el.childElementCount") == 0
    assert page.locator('img[src="x"], #turns b, #turns script').count() == 0
    expect(page).to_have_title("SkinGPT-4 consult")


def tab_to(page, target: str, limit: int = 20) -> list[str]:
    """Press Tab until the element with id ``target`` has the focus; the ids passed on the way."""
    seen = []
    for _ in range(limit):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.id"))
        if seen[-1] == target:
            return seen
    raise AssertionError(f"Tab never reached #{target}: {seen}")


def outline(page, selector: str) -> str:
    return page.locator(selector).evaluate(
        "(el) => { const s = getComputedStyle(el); return `${s.outlineStyle} ${s.outlineWidth}`; }")


def test_keyboard_only(page, photo_files):
    # Playwright subscribes to file choosers without waiting for the browser to take them over
    # (a message it does not wait for), and a chooser that opens before that is cancelled by the
    # headless browser: no event. So the subscription starts here, many round trips before Space.
    choosers = []
    page.on("filechooser", lambda c: choosers.append(c))
    assert tab_to(page, "choose-photos") == ["api-key", "choose-photos"]  # the camera is for phones
    page.keyboard.press("Shift+Tab")
    page.keyboard.type(API_KEY)
    page.keyboard.press("Tab")
    assert outline(page, 'label[for="choose-photos"]') == "solid 3px"  # the hidden input's ring
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    assert choosers == [chooser.value]
    chooser.value.set_files(str(photo_files[1]))
    expect(page.locator("#photos li")).to_have_count(1)
    assert tab_to(page, "question") == ["", "question"]  # the photo's Remove button, then here
    assert outline(page, "#question") == "solid 3px"
    page.keyboard.type("Does it itch?")
    page.keyboard.press("Enter")
    expect(page.locator(".turn.assistant")).to_have_count(1)
    expect(page.locator("#send")).to_be_enabled()
    assert answers(page)[0].strip()
    assert page.watch.chat_body(0)["messages"][0]["content"][-1]["text"] == "Does it itch?"
    assert tab_to(page, "new-consult") == ["send", "new-consult"]  # Stop is off when idle
    page.keyboard.press("Enter")
    expect(page.locator(".turn")).to_have_count(0)


def test_drag_and_drop_adds_a_photo(page, photo_files):
    page.locator("#drop-zone").evaluate("""(zone, b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'skin.jpg', {type: 'image/jpeg'}));
        for (const type of ['dragover', 'drop']) {
          zone.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data}));
        }
    }""", base64.b64encode(photo_files[1].read_bytes()).decode())
    expect(page.locator("#photos img")).to_have_count(1)
    expect(page.locator("#photos button")).to_have_attribute("aria-label", "Remove photo 1")


def test_a_file_that_is_not_a_photo_is_named(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    page.set_input_files("#choose-photos", str(notes))
    expect(page.locator("#error")).to_have_text("This file could not be read as a photo: notes.txt.")
    expect(page.locator("#photos li")).to_have_count(0)


def columns(page) -> tuple[dict, dict]:
    return page.locator(".side").bounding_box(), page.locator(".consult").bounding_box()


def fill_a_consult(page, photo_files) -> None:
    enter_key(page)
    add_photos(page, photo_files[1:3])
    ask(page, "What is this rash? " * 8)
    add_photos(page, photo_files[3:4])


@pytest.mark.parametrize("context_options", [PHONE])
def test_phone_layout_is_one_column_without_horizontal_scroll(page, photo_files, tmp_path):
    fill_a_consult(page, photo_files)
    expect(page.get_by_text("Take a photo")).to_be_visible()  # the camera, on a touch screen
    width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1] == 375
    side, consult = columns(page)
    assert side["x"] == consult["x"] and consult["y"] >= side["y"] + side["height"]
    # Whole, in a viewport as tall as the page: a full-page capture would drop the touch emulation.
    page.set_viewport_size({"width": 375, "height": page.evaluate("document.body.scrollHeight")})
    page.screenshot(path=tmp_path / "consult-375.png")


def test_desktop_layout_is_two_columns(page, photo_files, tmp_path):
    fill_a_consult(page, photo_files)
    expect(page.get_by_text("Take a photo")).to_be_hidden()  # a mouse: the file picker alone
    side, consult = columns(page)
    assert consult["x"] >= side["x"] + side["width"]
    page.screenshot(path=tmp_path / "consult-1280.png", full_page=True)


# The text a person reads, on its own background, in both colour schemes (WCAG AA: 4.5:1), and
# the focus ring on the question field's background (3:1 for what is not text).
CONTRAST = """() => {
  const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
  const lum = (c) => { const v = rgb(c).slice(0, 3).map((x) => { x /= 255;
    return x <= 0.03928 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2]; };
  const background = (el) => { for (; el; el = el.parentElement) {
    const c = getComputedStyle(el).backgroundColor; if ((rgb(c)[3] ?? 1) > 0) return c; }
    return 'rgb(255, 255, 255)'; };
  const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p);
    return (x + 0.05) / (y + 0.05); };
  const out = {};
  for (const sel of ['h1', '.warning', '.privacy', '.hint', 'label', '.drop-zone p', '.turn.user .text',
                     '.turn.assistant .text', '.turn .who', '.error', '#status', 'button.primary',
                     '#new-consult', '#photos button', '#api-key']) {
    const el = document.querySelector(sel);
    out[sel] = ratio(getComputedStyle(el).color, background(el));
  }
  const q = document.querySelector('#question');
  out['::placeholder'] = ratio(getComputedStyle(q, '::placeholder').color, background(q));
  q.focus();
  out['focus ring'] = ratio(getComputedStyle(q).outlineColor, background(q.parentElement));
  return out;
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_text_contrast_meets_wcag_aa(page, photo_files, scheme):
    page.emulate_media(color_scheme=scheme)
    enter_key(page)
    add_photos(page, photo_files[1:2])
    page.route(CHAT, lambda r: r.fulfill(status=200, content_type="text/event-stream",
                                         body=sse(delta("An answer."), "[DONE]")))
    ask(page, "A question?")
    page.route(CHAT, lambda r: r.fulfill(status=503, body=error_body("busy", "server_busy")))
    add_photos(page, photo_files[2:3])
    ask(page, "Again?")
    ratios = page.evaluate(CONTRAST)
    assert ratios.pop("focus ring") >= 3
    assert {sel: round(r, 2) for sel, r in ratios.items() if r < 4.5} == {}
