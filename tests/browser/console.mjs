// Drives the operator console in headless Chromium (Debian's), with every host but this
// machine unreachable: sign in, find a dead letter, retry it, see it retried; then the
// other pages and the docs page render. Run by tests/api/console.rs.
//
// node tests/browser/console.mjs BASE_URL API_KEY LETTER_ID NOTIFICATION_ID [SCREENSHOT_DIR]
// PLAYWRIGHT_CORE: the path of playwright-core's index.mjs (scripts/stack.sh install puts it
// under .tools/playwright).

const [base, key, letter, notification, shots] = process.argv.slice(2);
const { chromium } = await import(process.env.PLAYWRIGHT_CORE);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
});
const step = (what) => console.log(`console: ${what}`);
const shot = async (page, name) => {
  if (shots) await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
};
let page;
try {
  page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const outside = [];
  page.on("request", (request) => {
    if (!request.url().startsWith(base)) outside.push(request.url());
  });
  await page.goto(`${base}/console`);
  step("signing in");
  await page.getByLabel("API key").fill(key);
  await page.getByRole("button", { name: "Sign in" }).click();
  const row = page.locator(`tr[data-id="${letter}"]`);
  await row.waitFor({ timeout: 20000 });
  step("the dead letter is listed");
  if (!(await page.getByRole("heading", { name: /Causes/ }).isVisible())) throw new Error("no causes");
  await shot(page, "console-dead-letters");
  await page.getByRole("button", { name: `Retry dead letter ${letter}` }).click();
  await page.locator("#status", { hasText: `Dead letter ${letter} retried` }).waitFor({ timeout: 20000 });
  step("retried");
  await page.getByLabel("Status").selectOption("RETRIED");
  await page.getByRole("button", { name: "Find" }).click();
  await page.locator(`tr[data-id="${letter}"] td.status`, { hasText: "RETRIED" }).waitFor({ timeout: 20000 });
  step("the page shows it RETRIED");
  await page.locator(`tr[data-id="${letter}"]`).getByRole("button", { name: "Details" }).click();
  await page.getByRole("heading", { name: `Dead letter ${letter}` }).waitFor();
  await shot(page, "console-dead-letter-detail");

  await page.goto(`${base}/console#broadcasts`);
  await page.getByRole("heading", { name: "Broadcasts" }).waitFor();
  await shot(page, "console-broadcasts");
  await page.goto(`${base}/console#delivery`);
  await page.getByRole("heading", { name: "Per channel" }).waitFor();
  await page.locator("svg.chart circle").first().waitFor();
  step("the delivery chart is drawn");
  await shot(page, "console-delivery");
  await page.goto(`${base}/console#timeline/${notification}`);
  await page.locator("ol.timeline li").first().waitFor();
  const entries = await page.locator("ol.timeline li").count();
  if (entries < 3) throw new Error(`the timeline has ${entries} entries`);
  // The Slack message's refused attempt and the retried one that went out.
  await page.locator("ol.timeline li", { hasText: "SLACK: attempt 1: PERMANENT" }).waitFor();
  await page.locator("ol.timeline li", { hasText: "SLACK: attempt 2: SUCCESS" }).waitFor();
  step(`the timeline has ${entries} entries`);
  await shot(page, "console-timeline");

  const phone = await browser.newPage({ viewport: { width: 390, height: 844 } });
  await phone.goto(`${base}/console`);
  await phone.getByLabel("API key").fill(key);
  await phone.keyboard.press("Enter");
  await phone.getByRole("heading", { name: "Dead letters" }).waitFor();
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 2) throw new Error(`the phone-sized page scrolls sideways by ${overflow} px`);
  await shot(phone, "console-phone");
  step("the phone-sized page fits");

  await page.goto(`${base}/docs/`);
  await page.locator(".opblock").first().waitFor({ timeout: 30000 });
  await shot(page, "docs");
  step("the docs page renders");
  if (outside.length) throw new Error(`requests left the machine: ${outside.join(", ")}`);
} catch (error) {
  console.error(`console: FAILED: ${error.stack || error}`);
  if (page) await shot(page, "console-failure").catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
}
