// Publish herald jobs (one JSON document or NDJSON on stdin) with publisher confirms.

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.MappingIterator;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.ShutdownSignalException;
import java.io.IOException;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicBoolean;

public class Publish {
    static final long CONFIRM_TIMEOUT_MS = 10_000;

    static void fail(String message) {
        System.err.println("error: " + message);
        System.exit(1);
    }

    static String env(String key, String fallback) {
        String value = System.getenv(key);
        return value == null || value.isEmpty() ? fallback : value;
    }

    public static void main(String[] args) throws Exception {
        ObjectMapper mapper = new ObjectMapper();
        List<JsonNode> jobs = new ArrayList<>();
        // readValues walks successive JSON values: one pretty-printed job and NDJSON both parse.
        try (MappingIterator<JsonNode> it = mapper.readerFor(JsonNode.class).readValues(System.in)) {
            while (it.hasNextValue()) {
                JsonNode job = it.nextValue();
                for (String field : List.of("id", "vendor", "account")) {
                    if (!job.path(field).isTextual()) {
                        fail("job " + (jobs.size() + 1) + " has no string `" + field + "`");
                    }
                }
                jobs.add(job);
            }
        } catch (IOException e) {
            fail("job " + (jobs.size() + 1) + " is not JSON: " + e.getMessage());
        }
        if (jobs.isEmpty()) {
            fail("no job on stdin");
        }

        String exchange = env("HERALD_PREFIX", "herald") + ".jobs";
        String url = env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
        ConnectionFactory factory = new ConnectionFactory();
        factory.setUri(url);
        Connection conn = null;
        try {
            conn = factory.newConnection("herald producer example");
        } catch (IOException | TimeoutException e) {
            fail("cannot connect to " + url.substring(url.lastIndexOf('@') + 1) + ": " + e);
        }
        Channel channel = conn.createChannel();
        channel.confirmSelect();
        AtomicBoolean returned = new AtomicBoolean();
        // The broker sends basic.return before the confirm, so the flag is set when the confirm arrives.
        channel.addReturnListener((replyCode, replyText, ex, key, props, body) -> returned.set(true));

        for (JsonNode job : jobs) {
            String id = job.get("id").asText();
            String routingKey = job.get("vendor").asText() + "." + job.get("account").asText();
            AMQP.BasicProperties props = new AMQP.BasicProperties.Builder()
                    .contentType("application/json")
                    .deliveryMode(2)
                    .messageId(id)
                    .build();
            returned.set(false);
            try {
                // Never declares the exchange: herald owns the topology.
                channel.basicPublish(exchange, routingKey, true, props, mapper.writeValueAsBytes(job));
                channel.waitForConfirmsOrDie(CONFIRM_TIMEOUT_MS);
            } catch (TimeoutException e) {
                fail("job " + id + ": no publisher confirm within " + CONFIRM_TIMEOUT_MS / 1000 + "s");
            } catch (ShutdownSignalException e) {
                fail("job " + id + ": the broker closed the channel: " + e.getMessage()
                        + " (is HERALD_PREFIX right, and did herald declare " + exchange + "?)");
            } catch (IOException e) {
                // waitForConfirmsOrDie reports a nack as an IOException; a closed channel comes as its cause.
                if (e.getCause() instanceof ShutdownSignalException closed) {
                    fail("job " + id + ": the broker closed the channel: " + closed.getMessage()
                            + " (is HERALD_PREFIX right, and did herald declare " + exchange + "?)");
                }
                fail("job " + id + " was refused (nack) by the broker: " + e.getMessage());
            }
            if (returned.get()) {
                fail("job " + id + " was returned: nothing is bound to routing key " + routingKey + " on " + exchange);
            }
            System.out.println(id);
        }
        conn.close();
    }
}
