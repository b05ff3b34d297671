"""The page at / as a person uses it: the real server on a free local port, driven in headless Chromium.

Needs Debian's chromium and chromium-driver (`.ci/run` installs them) and selenium (the test extra).
"""

import shutil
import signal
import tempfile

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from test_serve import start_server  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SENTENCE = "Der alte hund trägt ein ball und der hut."


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no headless browser: apt-get install chromium chromium-driver (as .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    # Headless as root on a machine without a network: no sandbox, no GPU, no background connections.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--window-size=1600,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def cells(driver, mode: str) -> dict[tuple[int, int], float]:
    heatmap = driver.find_element(By.ID, mode)
    found = heatmap.find_elements(By.CSS_SELECTOR, "rect.cell")
    return {(int(c.get_attribute("data-row")), int(c.get_attribute("data-col"))): float(c.get_attribute("data-weight")) for c in found}


def test_the_page_translates_and_draws_the_three_attention_modes(browser, tiny_model_dir, tiny_translator, tmp_path):
    process, url = start_server(tiny_model_dir)
    try:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "pair").text)
        browser.find_element(By.ID, "source").send_keys(SENTENCE)
        browser.find_element(By.ID, "translate").click()
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "translation").text and cells(d, "cross"))

        # The page asks for two alternatives: a beam of three (the tiny recipe's own beam size).
        expected = tiny_translator.translate(SENTENCE, beam_size=3, n_best=3, return_attention=True)
        assert browser.find_element(By.ID, "translation").text == expected[0].text
        n_best = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#nbest li")]
        assert n_best == [f"{t.score:.3f} {t.text}" for t in expected]

        maps = expected[0].attention
        S, T = len(maps.source), len(maps.target)
        shapes = {"encoder": (S, S), "decoder": (T, T), "cross": (T, S)}
        for mode, (rows, cols) in shapes.items():
            heatmap = browser.find_element(By.ID, mode)
            assert (int(heatmap.get_attribute("data-rows")), int(heatmap.get_attribute("data-cols"))) == (rows, cols)
            drawn = cells(browser, mode)
            assert set(drawn) == {(i, j) for i in range(rows) for j in range(cols)}
            mean = getattr(maps, mode)[0].mean(dim=0)  # layer 1, the mean over heads (the page's default)
            assert all(abs(w - mean[i, j].item()) < 1e-3 for (i, j), w in drawn.items())
        decoder = cells(browser, "decoder")
        assert all(w == 0 for (i, j), w in decoder.items() if j > i)  # causal: nothing above the diagonal

        Select(browser.find_element(By.ID, "head")).select_by_visible_text("2 of 2")
        drawn = cells(browser, "cross")
        assert all(abs(w - maps.cross[0, 1, i, j].item()) < 1e-3 for (i, j), w in drawn.items())
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


def test_the_page_translates_within_the_servers_limits(browser, tiny_model_dir, tiny_translator):
    long = " ".join([SENTENCE] * 6)  # over the 128 pieces whose attention maps a response carries
    assert 128 < len(tiny_translator.tokenizer.pieces(long)) < tiny_translator.recipe.model.max_positions
    process, url = start_server(tiny_model_dir, "--max-hypotheses", "1")  # no room for alternatives
    try:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "pair").text)
        browser.find_element(By.ID, "source").send_keys(long)
        browser.find_element(By.ID, "translate").click()
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "translation").text)
        expected = tiny_translator.translate(long)
        assert browser.find_element(By.ID, "translation").text == expected
        assert [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#nbest li")] == [expected]
        assert browser.find_element(By.ID, "error").text.startswith("no attention maps: attention: the sentences have")
        assert not cells(browser, "cross")
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
