// herald-bench baseline: consume QUEUE with amqplib (prefetch PREFETCH), POST
// each body to RECEIVER_URL with fetch, ack on a 2xx answer (nack back otherwise).
import amqp from 'amqplib';

const { AMQP_URL, QUEUE, RECEIVER_URL } = process.env;
const prefetch = Number(process.env.PREFETCH ?? 200);

const connection = await amqp.connect(AMQP_URL);
const channel = await connection.createChannel();
await channel.prefetch(prefetch);
await channel.consume(QUEUE, async (message) => {
  try {
    const response = await fetch(RECEIVER_URL, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: message.content,
    });
    await response.arrayBuffer();
    if (response.ok) channel.ack(message);
    else channel.nack(message, false, true);
  } catch {
    channel.nack(message, false, true);
  }
});

process.on('SIGTERM', async () => {
  await connection.close().catch(() => {});
  process.exit(0);
});
