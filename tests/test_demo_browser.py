"""The demo page (GET /, /demo.js) and the browser client (GET /client.js) in a real headless Chromium
(Debian's `chromium` package, driven by Playwright), against a real gateway: what a user sees on the
page, and client.js as an ES module on its own.

The page's scores are sums of messages (`score_home` / `score_away`), so "every page agrees with the
gateway" is checked exactly: the gateway's own record of every message, read over a raw WebSocket
with a seq-0 position, gives the true totals.

A missing browser is a failure, not a skip: scripts/test.sh installs it. The screenshot of the
feed test goes to $DEMO_SCREENSHOT when set (`DEMO_SCREENSHOT=docs/demo.png` refreshes the README's),
else to the test's temporary directory."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

from conftest import SCALE, ws_url
from gateway import demo_feed
from gateway.client import Client
from support.client_fakegw import FakeGateway
from support.kafka_gateway import GatewayProcess, kafka_gateway
from support.tcpproxy import TcpProxy
from support.waits import wait_until
from support.ws import connected, recv, send

#: every Playwright wait (expect, wait_for_function, goto, clicks), in milliseconds
T = 10_000 * SCALE
expect.set_options(timeout=T)
MATCH = "/matches/football/{}"
SUBJECTS = [MATCH.format(n) for n in range(1, 11)]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("no `chromium` on PATH: the browser tests need Debian's chromium package "
                    "(scripts/test.sh installs it; by hand: apt-get install chromium)", pytrace=False)
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=path, headless=True, timeout=30_000 * SCALE,
                                     args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def new_page(browser: Browser) -> AsyncIterator[Any]:
    """`pg = await new_page(width=390)`: a fresh page in a context of its own; any uncaught exception
    in it, or console.error (client.js logs a throwing callback there), fails the test. Expected:
    Chromium's own messages about failed WebSocket connections where a test cuts the network.
    (/favicon.ico is served: its 404 would fail the test too.)"""
    contexts = []
    errors: list[str] = []

    async def make(width: int = 760, height: int = 940) -> Page:
        ctx = await browser.new_context(viewport={"width": width, "height": height})
        contexts.append(ctx)
        pg = await ctx.new_page()
        pg.set_default_timeout(T)
        pg.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))

        def on_console(m: ConsoleMessage) -> None:
            if m.type == "error" and not m.text.startswith("WebSocket connection to"):
                errors.append(f"console.error: {m.text} at {m.location}")

        pg.on("console", on_console)
        return pg

    try:
        yield make
    finally:
        for ctx in contexts:
            await ctx.close()
    assert not errors, errors


@pytest.fixture
async def page(new_page: Any) -> Page:
    return await new_page()


async def open_demo(page: Page, port: int, *, publish: bool = False) -> None:
    """Open the demo page (its random publishing off unless `publish`) and wait until it is live."""
    await page.goto(f"http://127.0.0.1:{port}/" + ("" if publish else "?publish=0"))
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    await expect(page.locator("#status")).to_have_text("live")


#: what the page shows, per subject: [home goals, away goals, seq counted through]
SHOWN = """() => Object.fromEntries([...document.querySelectorAll("li.match")].map((li) => [
    `/matches/football/${li.id.slice(6)}`,
    [Number(li.querySelector(".goals.home").textContent), Number(li.querySelector(".goals.away").textContent),
     Number(li.dataset.seq)]]))"""


async def gateway_totals(url: str) -> dict[str, list[int]]:
    """The true scores, from the gateway's own record: a raw WebSocket client learns each subject's
    epoch from `subscribed`, then subscribes again from seq 0 and adds up the whole replay."""
    ws = await connected(url)
    try:
        await send(ws, {"op": "subscribe", "subjects": [{"subject": s} for s in SUBJECTS]})
        epochs: dict[str, str] = {}
        while len(epochs) < len(SUBJECTS):
            f = await recv(ws)
            if f["op"] == "subscribed":
                epochs[f["subject"]] = f["epoch"]
        await send(ws, {"op": "subscribe",
                        "subjects": [{"subject": s, "epoch": epochs[s], "seq": 0} for s in SUBJECTS]})
        totals = {s: [0, 0, 0] for s in SUBJECTS}
        newest: dict[str, int] = {}
        while len(newest) < len(SUBJECTS) or any(totals[s][2] < newest[s] for s in SUBJECTS):
            f = await recv(ws)
            if f["op"] == "subscribed":
                assert f["recovered"] is True, f  # the whole history is still held
                newest[f["subject"]] = f["seq"]
            elif f["op"] == "msg" and f["subject"] in newest and not f.get("snapshot"):
                t = totals[f["subject"]]
                assert f["seq"] == t[2] + 1, f  # the replay: 1, 2, 3 ...
                t[2] = f["seq"]
                t[0] += f["content"] == "score_home"
                t[1] += f["content"] == "score_away"
        return totals
    finally:
        await ws.close()


async def shows(page: Page, truth: dict[str, list[int]]) -> None:
    """Wait until the page shows exactly `truth` (every match, goals and position)."""
    try:
        await page.wait_for_function(f"(truth) => JSON.stringify(({SHOWN})()) === JSON.stringify(truth)", arg=truth)
    finally:
        assert await page.evaluate(SHOWN) == truth


async def quiet(*pages: Page) -> list[dict[str, int]]:
    """Stop the pages' random publishing and wait for their last acks; returns their publish counts."""
    for pg in pages:
        await pg.evaluate("window.demo.setFeed(false)")
    for pg in pages:
        await pg.wait_for_function("window.demo.publishes.pending === 0")
    return [await pg.evaluate("({...window.demo.publishes})") for pg in pages]


def start_feed(gw: Any, seed: int, count: int, rate: float = 5) -> tuple[asyncio.Task[Any], demo_feed.FeedStats]:
    """The demo's feed inside the test's gateway (what `serve --demo` runs), bounded by `count`."""
    stats = demo_feed.FeedStats()
    task = asyncio.create_task(demo_feed.run(demo_feed.engine_publisher(gw.engine), rng=random.Random(seed),
                                             rate=rate, count=count, stats=stats))
    return task, stats


def screenshot_path(tmp_path: Path) -> Path:
    return Path(os.environ.get("DEMO_SCREENSHOT") or tmp_path / "demo.png")


async def test_two_pages_agree_with_the_feed_and_equal_the_sum_of_published_updates(gateway_factory, new_page,
                                                                                    tmp_path):
    """The demo as users see it: the feed runs, both pages publish random goals too, one page opens
    late (on a phone-sized screen) and replays every match from seq 0; at the end both show exactly
    the gateway's totals, which are exactly the updates that were acknowledged."""
    gw = await gateway_factory()
    first = await new_page()
    await open_demo(first, gw.port, publish=True)
    feed, stats = start_feed(gw, seed=13, count=70)
    await wait_until(lambda: stats.published >= 20, "the feed under way")
    late = await new_page(width=390, height=844)
    await open_demo(late, gw.port, publish=True)
    await feed
    for pg in (first, late):  # both pages published while the feed ran
        await pg.wait_for_function("window.demo.publishes.acked > 0")
    shot = screenshot_path(tmp_path)
    await first.locator("main").screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    published = await quiet(first, late)
    truth = await gateway_totals(ws_url(gw))
    await shows(first, truth)
    await shows(late, truth)
    assert [p["failed"] for p in published] == [0, 0]
    assert sum(h + a for h, a, _ in truth.values()) == stats.published + sum(p["acked"] for p in published)
    # the phone-sized page fits its screen: no sideways scrolling, every match inside the viewport
    assert await late.evaluate("document.documentElement.scrollWidth") <= 390
    for box in [await late.locator(f"#match-{n}").bounding_box() for n in range(1, 11)]:
        assert box is not None and box["x"] >= 8 and box["x"] + box["width"] <= 390 - 8
    assert await late.locator(".note:not(:empty)").count() == 0  # nothing incomplete


async def test_a_page_taken_offline_converges_and_says_what_it_recovered(gateway_factory, new_page):
    gw = await gateway_factory()
    feed, stats = start_feed(gw, seed=21, count=90)
    async with TcpProxy(gw.port) as net:
        away = await new_page()
        await open_demo(away, net.port)  # through `net`
        undisturbed = await new_page()
        await open_demo(undisturbed, gw.port)
        await wait_until(lambda: stats.published >= 10, "the feed under way")
        net.cut()  # the page's connection is reset, and reconnecting is refused
        status = away.locator("#status")
        await expect(status).to_have_attribute("data-state", "reconnecting")
        await expect(status).to_have_text(re.compile(r"^reconnecting( in \d+ s|\.\.\.)$"))
        at_cut = stats.published
        await wait_until(lambda: stats.published >= at_cut + 30, "30 updates while the page is offline")
        missed = stats.published - at_cut
        net.forward()
        # client.js backs off up to 10 s between attempts
        await expect(status).to_have_text(re.compile(r"^live: recovered \d+ messages?$"), timeout=2 * T)
        assert await away.evaluate("window.demo.conn.recovered") >= missed
        await feed
        truth = await gateway_totals(ws_url(gw))
        await shows(away, truth)
        await shows(undisturbed, truth)
        assert sum(h + a for h, a, _ in truth.values()) == stats.published


async def test_drop_control_shows_offline_publishes_and_recovers(gateway_factory, page):
    gw = await gateway_factory()
    await open_demo(page, gw.port, publish=True)
    status = page.locator("#status")
    async with Client([ws_url(gw)]) as other:
        await page.click("#drop")
        await expect(status).to_have_attribute("data-state", "offline")
        await expect(status).to_have_text(
            re.compile(r"^offline \(you dropped the connection\): reconnecting in [1-5] s$"))
        await expect(page.locator("#drop")).to_be_disabled()
        for _ in range(6):
            await other.publish(MATCH.format(4), "score_away")
        # the page's random goals while it is offline are not sent, and it says so
        await expect(page.locator("#publog li.failed").first).to_contain_text("offline")
        await expect(status).to_have_text(re.compile(r"^live: recovered \d+ messages?$"))
        assert await page.evaluate("window.demo.conn.recovered") >= 6
        published = await quiet(page)
        assert published[0]["failed"] >= 1
    truth = await gateway_totals(ws_url(gw))
    await shows(page, truth)
    assert truth[MATCH.format(4)][1] >= 6


async def test_page_says_when_the_history_is_gone(gateway_factory, page):
    """History holds 3 messages per subject: a late page cannot count match 1's 5 goals, and says so
    instead of showing a wrong score as if it were right; match 2's 2 goals are all still held."""
    gw = await gateway_factory(history=3)
    async with Client([ws_url(gw)]) as other:
        for _ in range(5):
            await other.publish(MATCH.format(1), "score_home")
        for content in ("score_home", "score_away"):
            await other.publish(MATCH.format(2), content)
        await open_demo(page, gw.port)
        one, two = page.locator("#match-1"), page.locator("#match-2")
        await expect(one.locator(".note")).to_have_text(re.compile(r"^history gone: updates before #5 "))
        await expect(one).to_have_class(re.compile(r"\bincomplete\b"))
        await expect(one.locator(".goals.home")).to_have_text("1")  # what it got: the latest, seq 5
        await expect(two.locator(".goals.home")).to_have_text("1")
        await expect(two.locator(".goals.away")).to_have_text("1")
        assert await two.locator(".note").text_content() == ""
        await other.publish(MATCH.format(1), "score_home")  # and it counts on from there
        await expect(one.locator(".goals.home")).to_have_text("2")
        await expect(one).to_have_attribute("data-seq", "6")


async def test_page_counts_a_restarted_gateways_new_history_from_zero_and_says_so(gateway_factory, page):
    """A standalone gateway's history dies with it: after a restart on the same port the old
    positions answer recovered:false, and the page counts the new epoch from its first message."""
    gw = await gateway_factory()
    async with Client([ws_url(gw)]) as other:
        for _ in range(3):
            await other.publish(MATCH.format(1), "score_home")
    await open_demo(page, gw.port)
    one = page.locator("#match-1")
    await expect(one.locator(".goals.home")).to_have_text("3")
    port = gw.port
    await gw.stop()
    await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
    gw2 = await gateway_factory(port=port)
    async with Client([ws_url(gw2)]) as other:
        await other.publish(MATCH.format(1), "score_away")
        await expect(one.locator(".goals.away")).to_have_text("1", timeout=2 * T)
        await expect(one.locator(".goals.home")).to_have_text("0")
        await expect(one.locator(".note")).to_have_text(re.compile(r"^new history \(epoch\)"))
        await expect(one).to_have_attribute("data-seq", "1")
        await other.publish(MATCH.format(1), "score_away")
        await expect(one.locator(".goals.away")).to_have_text("2")


async def test_a_reloaded_page_keeps_its_positions_and_recovers_only_what_it_missed(gateway_factory, page):
    """The page keeps its counts and positions in sessionStorage: back on the page, it subscribes from
    where it was (the gateway replays 4 messages, not 7) and shows the same scores as a fresh page."""
    gw = await gateway_factory()
    async with Client([ws_url(gw)]) as other:
        for _ in range(3):
            await other.publish(MATCH.format(2), "score_home")
        await open_demo(page, gw.port)
        await expect(page.locator("#match-2 .goals.home")).to_have_text("3")
        await page.goto("about:blank")  # away from the page (same tab: its sessionStorage stays)
        await wait_until(lambda: not any(MATCH.format(2) in s.subjects for s in gw.sessions), "the page to leave")
        for content in ("score_home", "score_away", "score_away", "score_away"):
            await other.publish(MATCH.format(2), content)
        await page.goto(f"http://127.0.0.1:{gw.port}/?publish=0")  # a fresh load, not the back-forward cache
        await expect(page.locator("#status")).to_have_text("live: recovered 4 messages")
        await expect(page.locator("#match-2 .goals.home")).to_have_text("4")
        await expect(page.locator("#match-2 .goals.away")).to_have_text("3")
        await page.reload()  # nothing missed: nothing replayed, the same scores
        await expect(page.locator("#status")).to_have_attribute("data-state", "live")
        await expect(page.locator("#match-2")).to_have_attribute("data-seq", "7")
        await expect(page.locator("#match-2 .goals.home")).to_have_text("4")
        await expect(page.locator("#match-2 .goals.away")).to_have_text("3")
        await other.publish(MATCH.format(2), "score_home")
        await expect(page.locator("#match-2 .goals.home")).to_have_text("5")
    assert await page.evaluate("window.demo.conn.recovered") == 0
    await shows(page, await gateway_totals(ws_url(gw)))


async def test_page_says_when_the_gateway_refuses_it(gateway_factory, page):
    """With auth on, the page (which has no token) is refused with 1008, and says so instead of
    promising a reconnect that client.js will not make."""
    gw = await gateway_factory(jwt_secret="demo-page-test-secret-0123456789abcdef")
    await page.goto(f"http://127.0.0.1:{gw.port}/?publish=0")
    status = page.locator("#status")
    await expect(status).to_have_attribute("data-state", "refused")
    await expect(status).to_have_text(re.compile(r"^refused by the gateway \(1008\b.*\): reload to try again$"))


async def test_tapping_a_team_publishes_a_goal_and_the_favicon_is_served(gateway_factory, page):
    gw = await gateway_factory()
    async with Client([ws_url(gw)]) as other:
        sub = await other.subscribe(MATCH.format(7))
        await open_demo(page, gw.port)
        row = page.locator("#match-7")
        await row.locator(".team.away").click()
        msg = await sub.get(timeout=5 * SCALE)
        assert (msg.subject, msg.content, msg.seq) == (MATCH.format(7), "score_away", 1)
        await expect(row.locator(".goals.away")).to_have_text("1")
        await expect(row.locator(".goals.home")).to_have_text("0")
        await expect(row.locator(".minute")).to_have_text("1'")  # the kick-off goal
        await expect(page.locator("#pubstats")).to_have_text(re.compile(r"^you published 1 \(0 waiting"))
        await expect(page.locator("#match-1 .goals.home")).to_have_text("0")  # other matches untouched
        assert await page.locator("li.match").count() == 10

    def get() -> tuple[int, str, bytes]:  # in a thread: the gateway runs on this test's loop
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/favicon.ico", timeout=5 * SCALE) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()

    status, ctype, body = await asyncio.to_thread(get)
    assert (status, ctype, body[:4]) == (200, "image/x-icon", b"\x00\x00\x01\x00")  # an ICO file


async def record_match(page: Page, n: int) -> None:
    """From now on, window.__seen lists what match `n` shows ([home, away, seq]) after each message
    the page counts (each WebSocket message is a task of its own, and the observer runs after it)."""
    await page.evaluate("""(n) => {
        const li = document.getElementById(`match-${n}`);
        window.__seen = [];
        new MutationObserver(() => window.__seen.push([li.querySelector(".goals.home").textContent,
                                                       li.querySelector(".goals.away").textContent,
                                                       li.dataset.seq]))
            .observe(li, { attributes: true, attributeFilter: ["data-seq"] });
    }""", n)


async def test_page_recovers_what_was_published_while_the_gateway_dropped_it(gateway_factory, page):
    gw = await gateway_factory()
    subject = MATCH.format(3)
    async with TcpProxy(gw.port) as net, Client([ws_url(gw)]) as other:
        await open_demo(page, net.port)  # the page reaches the gateway through `net`
        for _ in (1, 2):
            await other.publish(subject, "score_home")
        await expect(page.locator("#match-3 .goals.home")).to_have_text("2")
        await record_match(page, 3)

        net.refuse()  # the page cannot reconnect until net.forward()
        pages = [s for s in gw.sessions if subject in s.subjects]
        assert len(pages) == 1
        pages[0].transport.abort()  # the gateway drops the page's connection
        await wait_until(lambda: net.refused >= 1, "the page trying to reconnect")
        for _ in range(3, 21):  # published while the page is disconnected; acked = stored
            await other.publish(subject, "score_away")
        await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
        net.forward()

        await expect(page.locator("#match-3 .goals.away")).to_have_text("18", timeout=2 * T)
        await expect(page.locator("#status")).to_have_text("live: recovered 18 messages")
        # every message missed, once each, in order: recovered from the page's last position
        seen = await page.evaluate("window.__seen")
        assert seen == [["2", str(i - 2), str(i)] for i in range(3, 21)]
        await other.publish(subject, "score_home")  # and live again on the new connection
        await expect(page.locator("#match-3 .goals.home")).to_have_text("3")
        assert await page.evaluate("window.__seen.length") == 19


async def test_page_reconnects_when_the_network_goes_silent(gateway_factory, page):
    """No close, no reset: the page's connection just stops carrying anything, and so does its first
    attempt to reconnect. After 2 x heartbeat_ms of silence client.js must give each up and try
    again, without waiting for a closing or opening handshake that cannot complete; then it
    recovers what it missed. (A heartbeat long enough that the gateway never takes the Python
    publisher of a loaded machine for dead: 3 x heartbeat_ms without its pong closes it 1011.)"""
    gw = await gateway_factory(heartbeat_ms=1000)
    subject = MATCH.format(4)
    async with TcpProxy(gw.port) as net, Client([ws_url(gw)]) as other:
        await open_demo(page, net.port)
        await other.publish(subject, "score_home")
        await expect(page.locator("#match-4 .goals.home")).to_have_text("1")
        await record_match(page, 4)
        net.swallow()  # new connections hang in their opening handshake
        assert net.freeze() >= 1  # the page's WebSocket goes silent
        for _ in range(1, 6):
            await other.publish(subject, "score_away")
        await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
        await wait_until(lambda: net.swallowed >= 1, "the page trying to reconnect")
        net.forward()
        await expect(page.locator("#match-4 .goals.away")).to_have_text("5", timeout=2 * T)
        await expect(page.locator("#status")).to_have_attribute("data-state", "live")
        assert await page.evaluate("window.__seen") == [["1", str(i), str(i + 1)] for i in range(1, 6)]


def kafka_totals(records: list[Any]) -> dict[str, list[int]]:
    """The true scores in Kafka mode, from topic `matches` itself: per key `football/N`, the goals of
    its records and the seq of its last one (offset + 1)."""
    totals = {s: [0, 0, 0] for s in SUBJECTS}
    for r in records:
        t = totals["/matches/" + r.key.decode()]
        t[0] += r.value == b"score_home"
        t[1] += r.value == b"score_away"
        t[2] = max(t[2], r.offset + 1)
    return totals


@pytest.mark.kafka
@pytest.mark.timeout(300)  # in a run of its own, this includes starting the Kafka cluster
async def test_kafka_page_converges_through_a_second_gateway_when_its_gateway_is_killed(
        kafka_broker, gateway_factory, gateway_processes, page):
    """Two gateways on one Apache Kafka cluster: A (a process of its own) serves the page, which is
    told about B (?gateways=); the demo feed publishes through B. A is killed with SIGKILL mid-feed:
    the page carries on through B, replays what it missed from its positions (seq = Kafka offset + 1,
    so they are valid on any gateway of the cluster), and ends showing exactly what topic `matches`
    holds, whose new goals are exactly the feed's updates. (The topic is the demo's own and other
    tests write to it too: the updates are counted from what it held before.)"""
    await kafka_broker.create_topic("matches", 3)
    gw_a = GatewayProcess(kafka_broker, ["matches"], "gw-a")
    gateway_processes.append(gw_a)
    gw_b = await kafka_gateway(gateway_factory, kafka_broker, ["matches"], node_id="gw-b",
                               allowed_origins=(f"http://127.0.0.1:{gw_a.port}",))  # the page's origin
    await gw_a.healthy()
    before = kafka_totals(await kafka_broker.read_topic("matches", 3))
    await page.goto(f"http://127.0.0.1:{gw_a.port}/?publish=0&gateways={ws_url(gw_b)}")
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    await expect(page.locator("#node")).to_have_text("gateway gw-a")
    feed, stats = start_feed(gw_b, seed=31, count=80)
    # the page is counting the feed through A before A dies
    await wait_until(lambda: stats.published >= 20, "the feed under way")
    await page.wait_for_function(f"(before) => Object.entries(({SHOWN})()).some(([s, v]) => v[2] > before[s][2])",
                                 arg=before)
    gw_a.kill()  # SIGKILL, by PID: no close frame, no goodbye
    assert gw_a.proc.returncode == -signal.SIGKILL
    await expect(page.locator("#node")).to_have_text("gateway gw-b", timeout=2 * T)
    await feed
    assert stats.failed == 0
    truth = kafka_totals(await kafka_broker.read_topic("matches", 3))
    await shows(page, truth)
    new_goals = sum(h + a for h, a, _ in truth.values()) - sum(h + a for h, a, _ in before.values())
    assert new_goals == stats.published == 80
    assert await page.locator(".note:not(:empty)").count() == 0  # every match complete
    assert await page.evaluate("window.demo.client.stats.reconnects") >= 1


async def start_module_client(page: Page, port: int, url: str, subject: str, **options: Any) -> None:
    """Load client.js on its own (no demo page: a same-origin document, then a dynamic import) and
    subscribe one subject; window.__got collects [content, seq, snapshot] per message."""
    await page.goto(f"http://127.0.0.1:{port}/healthz")
    async with asyncio.timeout(5 * SCALE):
        await page.evaluate("""async ([url, subject, options]) => {
            const mod = await import("/client.js");
            window.GatewayError = mod.GatewayError;
            window.__got = [];
            window.__errors = [];
            window.__c = new mod.GatewayClient([url], { ...options, onError: (e) => window.__errors.push(e.code) });
            window.__c.subscribe(subject, (m) => window.__got.push([m.content, m.seq, m.snapshot]));
        }""", [url, subject, options])


async def test_client_js_as_an_es_module_against_the_gateway(gateway_factory, page):
    gw = await gateway_factory()
    async with Client([ws_url(gw)]) as other:
        await other.publish("/es/1", "before")
        await start_module_client(page, gw.port, ws_url(gw), "/es/1")
        await page.wait_for_function("window.__c.connected")
        await page.wait_for_function("window.__got.length === 1")
        sub = await other.subscribe("/es/1")
        await other.publish("/es/1", "from python")
        async with asyncio.timeout(5 * SCALE):  # page.evaluate itself waits for its promise unbounded
            ack = await page.evaluate('window.__c.publish("/es/1", "from the browser")')
        assert (ack["op"], ack["subject"], ack["seq"]) == ("ack", "/es/1", 3)
        got = [(await sub.get(timeout=5 * SCALE)) for _ in range(3)]
        assert [(m.content, m.seq) for m in got] == [("before", 1), ("from python", 2), ("from the browser", 3)]
        await page.wait_for_function("window.__got.length === 3")
        assert await page.evaluate("window.__got") == [
            ["before", 1, True], ["from python", 2, False], ["from the browser", 3, False]]
        # a refused publish rejects its promise with the gateway's error code
        async with asyncio.timeout(5 * SCALE):
            refused = await page.evaluate("""async () => {
                try { await window.__c.publish("no-leading-slash", "x"); return null; }
                catch (e) { return [e instanceof window.GatewayError, e.code]; }
            }""")
        assert refused == [True, "invalid_subject"]
        assert await page.evaluate("window.__c.stats") == {"messages": 3, "duplicates": 0, "gaps": 0,
                                                          "resubscribes": 0, "reconnects": 0,
                                                          "refreshes": 0, "expired": 0}
        await page.evaluate("window.__c.close()")
        await wait_until(lambda: len(gw.sessions) == 1, "the browser's session to end")


async def test_client_js_imported_by_a_page_of_another_origin(gateway_factory, page):
    """An application's page is rarely served by the gateway: it imports client.js from the gateway's
    origin. A module script from another origin is fetched with CORS, so without
    Access-Control-Allow-Origin on /client.js the import failed. The page here is another gateway's
    /healthz (another port: another origin), which the gateway lists in --allowed-origins."""
    other_origin = await gateway_factory()
    gw = await gateway_factory(allowed_origins=(f"http://127.0.0.1:{other_origin.port}",))
    await page.goto(f"http://127.0.0.1:{other_origin.port}/healthz")
    async with asyncio.timeout(5 * SCALE):
        await page.evaluate("""async ([origin, url]) => {
            const mod = await import(`${origin}/client.js`);
            window.__got = [];
            window.__c = new mod.GatewayClient([url]);
            window.__c.subscribe("/cors/1", (m) => window.__got.push(m.content));
        }""", [f"http://127.0.0.1:{gw.port}", ws_url(gw)])
    await page.wait_for_function("window.__c.connected")
    async with asyncio.timeout(5 * SCALE):
        ack = await page.evaluate('window.__c.publish("/cors/1", "from another origin")')
    assert (ack["subject"], ack["seq"]) == ("/cors/1", 1)
    await page.wait_for_function("window.__got.length === 1")
    assert await page.evaluate("window.__got") == ["from another origin"]
    await page.evaluate("window.__c.close()")


async def test_client_js_gap_duplicate_and_resubscribe_with_position(gateway_factory, page):
    """The client obligations against a scripted server: a `prev` gap makes it subscribe again with
    its position, a duplicate is dropped, a reconnect resubscribes with the last position."""
    gw = await gateway_factory()  # serves client.js
    async with FakeGateway() as fake:
        await start_module_client(page, gw.port, fake.url, "/g/1", backoffInitial=10)
        conn = await fake.accept()
        hello = await conn.handshake()
        assert hello["client"].startswith("gateway-js/")
        assert (await conn.expect("subscribe"))["subjects"] == [{"subject": "/g/1"}]
        await conn.subscribed("/g/1")
        await conn.msg("/g/1", 1, 0, "a")
        await conn.msg("/g/1", 3, 2, "c")  # 2 is missing
        again = await conn.expect("subscribe")
        assert again["subjects"] == [{"subject": "/g/1", "epoch": "e1", "seq": 1}]
        await conn.subscribed("/g/1", seq=3, recovered=True)
        for seq, content in ((2, "b"), (3, "c"), (2, "b"), (4, "d")):  # the second "b" is a duplicate
            await conn.msg("/g/1", seq, seq - 1, content)
        await page.wait_for_function("window.__got.length === 4")
        assert await page.evaluate("window.__got") == [["a", 1, False], ["b", 2, False], ["c", 3, False],
                                                      ["d", 4, False]]
        assert await page.evaluate("window.__c.stats") == {"messages": 4, "duplicates": 1, "gaps": 1,
                                                          "resubscribes": 1, "reconnects": 0,
                                                          "refreshes": 0, "expired": 0}

        await conn.close(1001)  # the gateway goes away: reconnect, resubscribe from the last position
        conn = await fake.accept()
        await conn.handshake()
        assert (await conn.expect("subscribe"))["subjects"] == [{"subject": "/g/1", "epoch": "e1", "seq": 4}]
        await page.evaluate("window.__c.close()")
        await conn.wait_closed()
        assert await page.evaluate("window.__errors") == []


# ---- 1.1: client.js's token provider and the `request` field -----------------------------------------

SECRET = "s3cret-for-tests-only-0123456789abcdef"


async def test_client_js_token_provider_refreshes_then_recovers_after_4001(gateway_factory, page):
    """Short tokens (2 s): client.js refreshes ahead of exp and keeps its session; then its refreshes
    are refused (a token for another `sub`), the gateway closes 4001 at exp, and client.js asks its
    provider again, reconnects and recovers every message published meanwhile, in order."""
    import time

    import jwt

    gw = await gateway_factory(jwt_secret=SECRET, jwt_leeway_ms=0, heartbeat_ms=500, history=10000)
    minted: list[str] = []

    def mint(sub: str) -> str:
        minted.append(sub)
        return jwt.encode({"sub": sub, "exp": int(time.time() + 2), "sub_allow": ["/>"], "pub_allow": ["/>"]},
                          SECRET, algorithm="HS256")

    await page.expose_function("mintToken", mint)
    await page.goto(f"http://127.0.0.1:{gw.port}/healthz")
    async with asyncio.timeout(5 * SCALE):
        await page.evaluate("""async (url) => {
            const mod = await import("/client.js");
            window.__got = [];
            window.__errors = [];
            window.__refuse = false;
            const provider = async () =>
                window.mintToken(window.__c && window.__c.connected && window.__refuse ? "someone-else" : "reader");
            window.__c = new mod.GatewayClient([url], {
                token: provider, backoffInitial: 10,
                onError: (e) => window.__errors.push([e.code, e.request || null]) });
            window.__c.subscribe("/tok/js", (m) => window.__got.push(Number(m.content)));
        }""", ws_url(gw))
    await page.wait_for_function("window.__c.connected")
    pub_token = jwt.encode({"sub": "writer", "exp": int(time.time() + 600), "pub_allow": ["/>"]}, SECRET)
    async with Client([ws_url(gw)], token=pub_token) as other:
        n = 0

        async def publish_until(js_condition: str) -> None:
            nonlocal n
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30 * SCALE
            while not await page.evaluate(js_condition):
                assert loop.time() < deadline, js_condition
                n += 1
                await other.publish("/tok/js", str(n))
                await asyncio.sleep(0.05)

        await publish_until("window.__c.stats.refreshes >= 2")  # two refreshes: past two lifetimes
        stats = await page.evaluate("window.__c.stats")
        assert (stats["reconnects"], stats["expired"]) == (0, 0)
        await page.evaluate("window.__refuse = true")
        await publish_until("window.__c.stats.expired >= 1 && window.__c.connected")
        for _ in range(10):  # and more on the new connection
            n += 1
            await other.publish("/tok/js", str(n))
        await page.wait_for_function(f"window.__got.length >= {n}")
        assert await page.evaluate("window.__got") == list(range(1, n + 1)), "nothing lost, nothing twice"
        errors = await page.evaluate("window.__errors")
        assert ["unauthorized", "refresh"] in errors      # the refused refresh
        assert ["unauthorized", None] in errors           # the expiry (then close 4001)
        assert minted.count("reader") >= 4 and "someone-else" in minted
        await page.evaluate("window.__c.close()")


async def test_client_js_tells_a_failed_publish_from_a_refused_subscribe(gateway_factory, page):
    gw = await gateway_factory()  # serves client.js
    async with FakeGateway() as fake:
        await start_module_client(page, gw.port, fake.url, "/g/1", backoffInitial=10)
        conn = await fake.accept()
        await conn.handshake()
        await conn.expect("subscribe")
        await conn.subscribed("/g/1")
        await page.evaluate('window.__c.subscribe("/g/2", () => {})')
        await conn.expect("subscribe")
        await conn.send({"op": "error", "code": "forbidden", "subject": "/g/1", "request": "publish",
                         "message": "no publishing here"})
        await conn.send({"op": "error", "code": "forbidden", "subject": "/g/2", "request": "subscribe",
                         "message": "no reading there"})
        await conn.msg("/g/1", 1, 0, "still subscribed")
        await page.wait_for_function("window.__got.length === 1")
        assert await page.evaluate("window.__errors") == ["forbidden", "forbidden"]
        assert await page.evaluate("[window.__c.handlers.has('/g/1'), window.__c.handlers.has('/g/2')]") \
            == [True, False]
        await page.evaluate("window.__c.close()")
