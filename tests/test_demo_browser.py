"""The demo page (GET /) and the browser client (GET /client.js) in a real headless Chromium (Debian's
`chromium` package, driven by Playwright), against a real gateway: what a user sees on the page, and
client.js as an ES module on its own.

A missing browser is a failure, not a skip: scripts/test.sh installs it."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import SCALE, ws_url
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect
from support.client_fakegw import FakeGateway
from support.tcpproxy import TcpProxy
from support.waits import wait_until

from gateway.client import Client

#: every Playwright wait (expect, wait_for_function, goto, clicks), in milliseconds
T = 10_000 * SCALE
expect.set_options(timeout=T)
MATCH = "/matches/football/{}"


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
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh page; any uncaught exception in it, or console.error (client.js logs a throwing
    callback there), fails the test. Expected: Chromium's own messages about failed WebSocket
    connections where a test cuts the network, and the 404 of the /favicon.ico it asks for."""
    ctx = await browser.new_context()
    pg = await ctx.new_page()
    pg.set_default_timeout(T)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))

    def on_console(m: ConsoleMessage) -> None:
        if m.type == "error" and not m.text.startswith("WebSocket connection to") \
                and not m.location.get("url", "").endswith("/favicon.ico"):
            errors.append(f"console.error: {m.text} at {m.location}")

    pg.on("console", on_console)
    try:
        yield pg
    finally:
        await ctx.close()
    assert not errors, errors


async def open_demo(page: Page, port: int) -> None:
    await page.goto(f"http://127.0.0.1:{port}/")
    await expect(page.locator("#status")).to_have_text(re.compile(r"^connected "))


async def record_row(page: Page, n: int) -> None:
    """From now on, window.__seen lists every (content, seq) that row `n` of the table displays, one
    entry per update (each WebSocket message is a task of its own, and the observer runs after it)."""
    await page.evaluate("""(n) => {
        const row = document.getElementById(`row-${n}`);
        window.__seen = [];
        new MutationObserver(() => window.__seen.push(
            [row.querySelector(".content").textContent, row.querySelector(".seq").textContent]
        )).observe(row, { childList: true, characterData: true, subtree: true });
    }""", n)


async def test_page_shows_scores_published_elsewhere_and_its_form_publishes(gateway_factory, page):
    gw = await gateway_factory()
    async with Client([ws_url(gw)]) as other:
        await other.publish(MATCH.format(2), "0-0 (kick-off)")  # before the page opens
        await open_demo(page, gw.port)
        row2 = page.locator("#row-2")
        # the current score on arrival (the subject's snapshot), then live updates
        await expect(row2.locator(".content")).to_have_text("0-0 (kick-off)")
        await expect(row2.locator(".seq")).to_have_text("1")
        await other.publish(MATCH.format(2), "1-0 (12')")
        await expect(row2.locator(".content")).to_have_text("1-0 (12')")
        await expect(row2.locator(".seq")).to_have_text("2")
        await expect(page.locator("#row-1 .content")).to_have_text("-")  # other matches untouched
        assert await page.locator("#matches tr").count() == 10

        # the page's form publishes: another client receives it, and the page shows it too
        sub = await other.subscribe(MATCH.format(7))
        await page.select_option("#match", MATCH.format(7))
        await page.fill("#content", "2-1 (78')")
        await page.click("#pub button")
        msg = await sub.get(timeout=5 * SCALE)
        assert (msg.subject, msg.content, msg.seq) == (MATCH.format(7), "2-1 (78')", 1)
        await expect(page.locator("#row-7 .content")).to_have_text("2-1 (78')")
        await expect(page.locator("#content")).to_have_value("")  # cleared once acked
        await expect(page.locator("#status")).to_have_text(re.compile(r"^connected "))


async def test_page_recovers_what_was_published_while_the_gateway_dropped_it(gateway_factory, page):
    gw = await gateway_factory()
    subject = MATCH.format(3)
    async with TcpProxy(gw.port) as net, Client([ws_url(gw)]) as other:
        await open_demo(page, net.port)  # the page reaches the gateway through `net`
        for i in (1, 2):
            await other.publish(subject, f"score {i}")
        await expect(page.locator("#row-3 .content")).to_have_text("score 2")
        await record_row(page, 3)

        net.refuse()  # the page cannot reconnect until net.forward()
        pages = [s for s in gw.sessions if subject in s.subjects]
        assert len(pages) == 1
        pages[0].transport.abort()  # the gateway drops the page's connection
        await wait_until(lambda: net.refused >= 1, "the page trying to reconnect")
        for i in range(3, 21):  # published while the page is disconnected; acked = stored
            await other.publish(subject, f"score {i}")
        await expect(page.locator("#status")).not_to_have_text(re.compile(r"^connected "))
        net.forward()

        await expect(page.locator("#row-3 .content")).to_have_text("score 20")
        await expect(page.locator("#status")).to_have_text(re.compile(r"^connected "))
        # every message missed, once each, in order: recovered from the page's last position
        seen = await page.evaluate("window.__seen")
        assert seen == [[f"score {i}", str(i)] for i in range(3, 21)]
        await other.publish(subject, "score 21")  # and live again on the new connection
        await expect(page.locator("#row-3 .content")).to_have_text("score 21")
        assert await page.evaluate("window.__seen.length") == 19


async def test_page_reconnects_when_the_network_goes_silent(gateway_factory, page):
    """No close, no reset: the page's connection just stops carrying anything, and so does its first
    attempt to reconnect. After 2 x heartbeat_ms of silence client.js must give each up and try
    again, without waiting for a closing or opening handshake that cannot complete; then it
    recovers what it missed."""
    gw = await gateway_factory(heartbeat_ms=200)
    subject = MATCH.format(4)
    async with TcpProxy(gw.port) as net, Client([ws_url(gw)]) as other:
        await open_demo(page, net.port)
        await other.publish(subject, "0-0")
        await expect(page.locator("#row-4 .content")).to_have_text("0-0")
        await record_row(page, 4)
        net.swallow()  # new connections hang in their opening handshake
        assert net.freeze() >= 1  # the page's WebSocket goes silent
        for i in range(1, 6):
            await other.publish(subject, f"{i}-0")
        await expect(page.locator("#status")).to_have_text(
            re.compile(r"^(disconnected 1006 heartbeat timeout|connecting)"))
        await wait_until(lambda: net.swallowed >= 1, "the page trying to reconnect")
        net.forward()
        await expect(page.locator("#row-4 .content")).to_have_text("5-0")
        await expect(page.locator("#status")).to_have_text(re.compile(r"^connected "))
        assert await page.evaluate("window.__seen") == [[f"{i}-0", str(i + 1)] for i in range(1, 6)]


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
        assert await page.evaluate("window.__c.stats") == {"duplicates": 0, "gaps": 0, "reconnects": 0,
                                                          "refreshes": 0, "expired": 0}
        await page.evaluate("window.__c.close()")
        await wait_until(lambda: len(gw.sessions) == 1, "the browser's session to end")


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
        assert await page.evaluate("window.__c.stats") == {"duplicates": 1, "gaps": 1, "reconnects": 0,
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
            window.__c = new mod.GatewayClient([url], { token: provider, backoffInitial: 10,
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
