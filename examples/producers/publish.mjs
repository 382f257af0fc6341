// Publish one herald job with publisher confirms (npm install amqplib).
import amqp from "amqplib";

const job = {
  v: 1,
  id: "friend-request-17",
  vendor: "netease",
  account: "default",
  from: "u-bob",
  to: { user: "u-alice" },
  key: "friend.request",
  data: "bob wants to be friends",
  delivery: "online",
};

const conn = await amqp.connect(process.env.AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/%2f");
const channel = await conn.createConfirmChannel();
channel.publish("herald.jobs", `${job.vendor}.${job.account}`, Buffer.from(JSON.stringify(job)), {
  contentType: "application/json",
  persistent: true,
  messageId: job.id,
});
await channel.waitForConfirms();
console.log("published", job.id);
await conn.close();
