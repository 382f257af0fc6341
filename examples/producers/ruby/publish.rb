# Publish herald jobs (one JSON document or NDJSON on stdin) with publisher confirms.
require "bunny"
require "json"

CONFIRM_TIMEOUT_S = 10

def fail!(message)
  warn "error: #{message}"
  exit 1
end

def read_jobs(text)
  [JSON.parse(text)]
rescue JSON::ParserError
  # Not one document: NDJSON, one job per non-blank line.
  text.each_line.reject { |l| l.strip.empty? }.each_with_index.map do |line, i|
    JSON.parse(line)
  rescue JSON::ParserError => e
    fail!("job #{i + 1} is not JSON: #{e.message}")
  end
end

jobs = read_jobs($stdin.read)
fail!("no job on stdin") if jobs.empty?
jobs.each_with_index do |job, i|
  %w[id vendor account].each do |field|
    fail!("job #{i + 1} has no string `#{field}`") unless job.is_a?(Hash) && job[field].is_a?(String)
  end
end

exchange_name = "#{ENV.fetch('HERALD_PREFIX', 'herald')}.jobs"
url = ENV.fetch("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
closed_hint = "is HERALD_PREFIX right, and did herald declare #{exchange_name}?"

begin
  conn = Bunny.new(url, logger: Logger.new(nil))
  conn.start
rescue Bunny::Exception => e
  fail!("cannot connect to #{url.split('@').last}: #{e.message}")
end

channel = conn.create_channel
channel.confirm_select
# no_declare: herald owns the topology; a producer never declares the exchange.
exchange = Bunny::Exchange.new(channel, :topic, exchange_name, no_declare: true)
returned = false
# Bunny runs this on its reader thread before it handles the confirm, so it is set in time.
exchange.on_return { returned = true }

jobs.each do |job|
  routing_key = "#{job['vendor']}.#{job['account']}"
  exchange.publish(JSON.generate(job), routing_key: routing_key, mandatory: true, persistent: true,
                                       content_type: "application/json", message_id: job["id"])
  # Bunny's wait_for_confirms has no deadline and keeps waiting when the broker closes
  # the channel (a missing exchange, say), so wait here; it then raises the broker's error.
  deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + CONFIRM_TIMEOUT_S
  until channel.closed? || channel.unconfirmed_set.empty?
    fail!("job #{job['id']}: no publisher confirm within #{CONFIRM_TIMEOUT_S}s") if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
    sleep 0.005
  end
  acked = channel.wait_for_confirms
  fail!("job #{job['id']} was refused (nack) by the broker") unless acked
  fail!("job #{job['id']} was returned: nothing is bound to routing key #{routing_key} on #{exchange_name}") if returned
  puts job["id"]
  $stdout.flush
rescue Bunny::ChannelAlreadyClosed, Bunny::ChannelLevelException => e
  fail!("job #{job['id']}: the broker closed the channel: #{e.message} (#{closed_hint})")
end
conn.close
