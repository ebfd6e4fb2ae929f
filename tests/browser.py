"""Headless Chromium for page tests (Debian's chromium + chromium-driver, driven by Selenium)."""

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = os.environ.get("TRANSFERKIT_TEST_ARTIFACTS", os.path.join(os.path.dirname(__file__), "..", "test-artifacts"))


def on_ci() -> bool:
    """Whether this is a CI run (``CI=true``, as GitHub Actions, GitLab CI and most others set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def chromium():
    """A headless Chromium WebDriver. Where Chromium or chromedriver is not installed: a skip with the reason,
    except under CI=true, where the page tests must run, so it is a failure."""
    if not (CHROMIUM and CHROMEDRIVER):
        missing = " and ".join(name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER))
                               if not path)
        reason = f"{missing} not installed (apt-get install chromium chromium-driver)"
        if on_ci():
            pytest.fail(f"CI=true and {reason}: the page tests must run on CI", pytrace=False)
        pytest.skip(reason)
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,2000"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def save_screenshot(driver, name: str) -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    driver.save_screenshot(path)
    return path
