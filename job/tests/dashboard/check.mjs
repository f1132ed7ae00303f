// Drives the dashboard in real headless Chromium (Debian's, through
// playwright-core; no downloaded browser), for tests/http.rs:
//  1. the page loads with no console errors;
//  2. the top 10 shows, for each content id, the title Postgres holds (TITLES_FILE);
//  3. the figures change as more events arrive;
//  4. a screenshot is saved (SCREENSHOT);
//  5. it prints `stop-the-job`, and the page must then say the job is unreachable.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const url = process.env.DASHBOARD_URL;
const titles = JSON.parse(readFileSync(process.env.TITLES_FILE, "utf8"));
const fail = (message) => { console.log("FAIL: " + message); process.exit(1); };

const browser = await chromium.launch({
  executablePath: process.env.ENGAGE_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--headless=new"],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
const errors = [];
page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
page.on("pageerror", (e) => errors.push(String(e)));

await page.goto(url);
await page.waitForSelector("#status.live", { timeout: 30000 });
console.log("live");

// 2. the top 10, each title as Postgres has it.
await page.waitForSelector("#top-table tbody tr[data-content-id]", { timeout: 60000 });
const rows = await page.$$eval("#top-table tbody tr[data-content-id]", (trs) =>
  trs.map((tr) => ({ id: tr.dataset.contentId, title: tr.children[1].textContent })));
if (rows.length === 0 || rows.length > 10) fail(`top list has ${rows.length} rows`);
for (const row of rows) {
  if (titles[row.id] !== row.title) fail(`content ${row.id}: page shows "${row.title}", Postgres has "${titles[row.id]}"`);
}
console.log(`top ${rows.length} titles match Postgres`);

// 3. figures move as events arrive.
const total = async () => Number((await page.textContent("#changes-total")).replace(/[^0-9]/g, ""));
const first = await total();
const deadline = Date.now() + 30000;
while ((await total()) <= first) {
  if (Date.now() > deadline) fail(`changes total stayed at ${first}`);
  await page.waitForTimeout(250);
}
console.log(`changes total moved from ${first} to ${await total()}`);
await page.waitForSelector("#kpis .card", { timeout: 10000 });

// 4. the screenshot, under load.
await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
if (errors.length) fail("console errors: " + errors.join(" | "));

// 5. the job goes away: the page must say so.
console.log("stop-the-job");
await page.waitForSelector("#status.unreachable", { timeout: 20000 });
const banner = await page.isVisible("#banner");
if (!banner) fail("the unreachable banner is not shown");
console.log("unreachable shown");
await browser.close();
