<?php
// Publish herald jobs (one JSON document or NDJSON on stdin) with publisher confirms.

declare(strict_types=1);

// Composer's autoloader when `composer install` ran here, else Debian's php-amqplib.
$composer = __DIR__ . '/vendor/autoload.php';
require file_exists($composer) ? $composer : 'PhpAmqpLib/autoload.php';

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Exception\AMQPProtocolChannelException;
use PhpAmqpLib\Exception\AMQPTimeoutException;
use PhpAmqpLib\Message\AMQPMessage;

const CONFIRM_TIMEOUT_S = 10;

function fail(string $message): never
{
    fwrite(STDERR, "error: $message\n");
    exit(1);
}

function read_jobs(string $text): array
{
    try {
        return [json_decode($text, true, 512, JSON_THROW_ON_ERROR)];
    } catch (JsonException) {
        // Not one document: NDJSON, one job per non-blank line.
    }
    $lines = array_values(array_filter(explode("\n", $text), fn ($l) => trim($l) !== ''));
    $jobs = [];
    foreach ($lines as $i => $line) {
        try {
            $jobs[] = json_decode($line, true, 512, JSON_THROW_ON_ERROR);
        } catch (JsonException $e) {
            fail(sprintf('job %d is not JSON: %s', $i + 1, $e->getMessage()));
        }
    }
    return $jobs;
}

$jobs = read_jobs(stream_get_contents(STDIN));
if ($jobs === [] || $jobs === [null]) {
    fail('no job on stdin');
}
foreach ($jobs as $i => $job) {
    foreach (['id', 'vendor', 'account'] as $field) {
        if (!is_array($job) || !is_string($job[$field] ?? null)) {
            fail(sprintf('job %d has no string `%s`', $i + 1, $field));
        }
    }
}

$exchange = (getenv('HERALD_PREFIX') ?: 'herald') . '.jobs';
$url = parse_url(getenv('AMQP_URL') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f');
$vhost = isset($url['path']) && $url['path'] !== '/' ? rawurldecode(substr($url['path'], 1)) : '/';
$hint = "is HERALD_PREFIX right, and did herald declare $exchange?";

try {
    $conn = new AMQPStreamConnection(
        $url['host'],
        $url['port'] ?? 5672,
        rawurldecode($url['user'] ?? 'guest'),
        rawurldecode($url['pass'] ?? 'guest'),
        $vhost,
    );
} catch (Throwable $e) {
    fail(sprintf('cannot connect to %s:%d: %s', $url['host'], $url['port'] ?? 5672, $e->getMessage()));
}

$channel = $conn->channel();
$channel->confirm_select();
$outcome = null;
$channel->set_ack_handler(function () use (&$outcome) {
    $outcome ??= 'ack';
});
$channel->set_nack_handler(function () use (&$outcome) {
    $outcome = 'nack';
});
// The broker sends basic.return before the confirm, so this runs first.
$channel->set_return_listener(function () use (&$outcome) {
    $outcome = 'returned';
});

foreach ($jobs as $job) {
    $id = $job['id'];
    $routingKey = "{$job['vendor']}.{$job['account']}";
    $outcome = null;
    $message = new AMQPMessage(json_encode($job, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES), [
        'content_type' => 'application/json',
        'delivery_mode' => AMQPMessage::DELIVERY_MODE_PERSISTENT,
        'message_id' => $id,
    ]);
    try {
        // Never declares the exchange: herald owns the topology.
        $channel->basic_publish($message, $exchange, $routingKey, true);
        $channel->wait_for_pending_acks_returns(CONFIRM_TIMEOUT_S);
    } catch (AMQPTimeoutException) {
        fail(sprintf('job %s: no publisher confirm within %ds', $id, CONFIRM_TIMEOUT_S));
    } catch (AMQPProtocolChannelException $e) {
        fail(sprintf('job %s: the broker closed the channel: %s (%s)', $id, $e->getMessage(), $hint));
    }
    match ($outcome) {
        'ack' => print("$id\n"),
        'nack' => fail("job $id was refused (nack) by the broker"),
        'returned' => fail("job $id was returned: nothing is bound to routing key $routingKey on $exchange"),
        default => fail(sprintf('job %s: no publisher confirm within %ds', $id, CONFIRM_TIMEOUT_S)),
    };
}
$channel->close();
$conn->close();
