// A minimal webhook receiver for trying sql/examples/webhook.sql and timing
// the webhook sink: answers 200 to every POST, counts requests, distinct
// `webhook-id`s and rows, and prints the counts once a second while they
// change. Rates are over the current run of traffic: from its first request
// after a pause of 5 s or more to its latest. No dependencies (Node's own
// http module); verifies no signature.
//
//   node scripts/webhook-receiver.mjs 8088
//   ENGAGE_WEBHOOK_URL=http://127.0.0.1:8088/ engage run sql/examples/webhook.sql
import http from 'node:http';

const port = Number(process.argv[2] ?? 8088);
let requests = 0;
let rows = 0;
const ids = new Set();
let first = 0;
let last = 0;
// Requests and rows of the current run of traffic.
let runRequests = 0;
let runRows = 0;

http
  .createServer((req, res) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString();
      const now = Date.now();
      if (now - last >= 5000) {
        first = now;
        runRequests = 0;
        runRows = 0;
      }
      last = now;
      const value = JSON.parse(body);
      const count = Array.isArray(value) ? value.length : 1;
      requests += 1;
      rows += count;
      runRequests += 1;
      runRows += count;
      ids.add(req.headers['webhook-id']);
      res.writeHead(200).end();
    });
  })
  .listen(port, '127.0.0.1', () => console.log(`listening on http://127.0.0.1:${port}/`));

let printed = -1;
setInterval(() => {
  if (requests === printed) return;
  printed = requests;
  const secs = Math.max((last - first) / 1000, 0.001);
  console.log(
    `requests ${requests}, distinct ids ${ids.size}, rows ${rows}; this run: ` +
      `${runRequests} requests, ${runRows} rows in ${secs.toFixed(2)} s, ` +
      `${Math.round(runRequests / secs)} requests/s, ${Math.round(runRows / secs)} rows/s`,
  );
}, 1000);
