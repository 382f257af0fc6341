// Publish herald jobs (one JSON document or NDJSON on stdin) with publisher confirms.
import { existsSync, readFileSync } from "node:fs";
import amqp from "amqplib";
import Ajv2020 from "ajv/dist/2020.js";

const CONFIRM_TIMEOUT_MS = 10_000;
const REPO_SCHEMA = new URL("../../../docs/job.schema.json", import.meta.url);

function fail(message) {
  console.error(`error: ${message}`);
  process.exit(1);
}

function readJobs(text) {
  try {
    return [JSON.parse(text)];
  } catch {
    // Not one document: NDJSON, one job per non-blank line.
    return text
      .split("\n")
      .filter((line) => line.trim() !== "")
      .map((line, i) => {
        try {
          return JSON.parse(line);
        } catch (e) {
          return fail(`job ${i + 1} is not JSON: ${e.message}`);
        }
      });
  }
}

function validator() {
  const path = existsSync(REPO_SCHEMA) ? REPO_SCHEMA : process.env.HERALD_SCHEMA;
  if (!path) {
    console.error("note: no docs/job.schema.json and no HERALD_SCHEMA; jobs are not validated");
    return null;
  }
  // Formats (schemars' uint32, date-time) are annotations here, as in Python's jsonschema;
  // herald checks expires_at itself.
  const ajv = new Ajv2020({ validateFormats: false });
  return ajv.compile(JSON.parse(readFileSync(path, "utf8")));
}

function check(jobs, validate) {
  jobs.forEach((job, i) => {
    if (validate && !validate(job)) {
      const [e] = validate.errors;
      fail(`job ${i + 1} does not match the herald job schema at ${e.instancePath || "(job)"}: ${e.message}`);
    }
    for (const field of ["id", "vendor", "account"]) {
      if (typeof job?.[field] !== "string") fail(`job ${i + 1} has no string \`${field}\``);
    }
  });
}

// Resolves once the broker confirms; rejects on a nack, a return, a closed channel or the timeout.
function publish(channel, exchange, job) {
  const routingKey = `${job.vendor}.${job.account}`;
  return new Promise((resolve, reject) => {
    let returned = false;
    const timer = setTimeout(
      () => reject(new Error(`job ${job.id}: no publisher confirm within ${CONFIRM_TIMEOUT_MS / 1000}s`)),
      CONFIRM_TIMEOUT_MS,
    );
    const onReturn = () => (returned = true);
    const onClose = () => reject(new Error(`job ${job.id}: ${closeReason ?? "the channel closed"}`));
    channel.once("return", onReturn);
    channel.once("close", onClose);
    // The broker sends basic.return before the confirm, so `returned` is set when the callback runs.
    channel.publish(
      exchange,
      routingKey,
      Buffer.from(JSON.stringify(job)),
      { persistent: true, contentType: "application/json", messageId: job.id, mandatory: true },
      (err) => {
        clearTimeout(timer);
        channel.off("return", onReturn);
        channel.off("close", onClose);
        // A closed channel fails every pending confirm too; its reason is the one to report.
        if (err) reject(new Error(`job ${job.id}: ${closeReason ?? "was refused (nack) by the broker"}`));
        else if (returned)
          reject(new Error(`job ${job.id} was returned: nothing is bound to routing key ${routingKey} on ${exchange}`));
        else resolve();
      },
    );
  });
}

let closeReason;

const text = readFileSync(0, "utf8");
const jobs = readJobs(text);
if (jobs.length === 0) fail("no job on stdin");
check(jobs, validator());

const exchange = `${process.env.HERALD_PREFIX ?? "herald"}.jobs`;
const url = process.env.AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/%2f";
let conn;
try {
  conn = await amqp.connect(url);
} catch (e) {
  fail(`cannot connect to ${url.split("@").pop()}: ${e.message}`);
}
// Without a listener, a connection lost mid-run would crash with a stack trace.
conn.on("error", (e) => fail(`lost the connection to the broker: ${e.message}`));
const channel = await conn.createConfirmChannel();
channel.on("error", (e) => {
  closeReason = `the broker closed the channel: ${e.message} (is HERALD_PREFIX right, and did herald declare ${exchange}?)`;
});
try {
  for (const job of jobs) {
    // Never declares the exchange: herald owns the topology.
    await publish(channel, exchange, job);
    console.log(job.id);
  }
  await conn.close();
} catch (e) {
  fail(e.message);
}
