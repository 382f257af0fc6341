// Command publish sends herald jobs (one JSON document or NDJSON on stdin)
// with publisher confirms.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

const confirmTimeout = 10 * time.Second

type job struct {
	ID      string `json:"id"`
	Vendor  string `json:"vendor"`
	Account string `json:"account"`
	body    json.RawMessage
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "error: "+format+"\n", args...)
	os.Exit(1)
}

func getenv(key, fallback string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return fallback
}

// readJobs decodes successive JSON values, so one pretty-printed job and NDJSON both work.
func readJobs(r io.Reader) []job {
	var jobs []job
	dec := json.NewDecoder(r)
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); errors.Is(err, io.EOF) {
			return jobs
		} else if err != nil {
			fail("job %d is not JSON: %v", len(jobs)+1, err)
		}
		var j job
		if err := json.Unmarshal(raw, &j); err != nil || j.ID == "" || j.Vendor == "" || j.Account == "" {
			fail("job %d needs string fields id, vendor and account", len(jobs)+1)
		}
		j.body = raw
		jobs = append(jobs, j)
	}
}

func main() {
	jobs := readJobs(os.Stdin)
	if len(jobs) == 0 {
		fail("no job on stdin")
	}
	exchange := getenv("HERALD_PREFIX", "herald") + ".jobs"
	url := getenv("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")

	conn, err := amqp.Dial(url)
	if err != nil {
		fail("cannot connect to %s: %v", url[strings.LastIndex(url, "@")+1:], err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		fail("cannot open a channel: %v", err)
	}
	if err := ch.Confirm(false); err != nil {
		fail("the broker refused publisher confirms: %v", err)
	}
	// Buffered: the client delivers a return (sent before the confirm) without waiting for us.
	returns := ch.NotifyReturn(make(chan amqp.Return, 1))
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 1))
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))

	for _, j := range jobs {
		key := j.Vendor + "." + j.Account
		// Never declares the exchange: herald owns the topology.
		err := ch.Publish(exchange, key, true, false, amqp.Publishing{
			ContentType:  "application/json",
			DeliveryMode: amqp.Persistent,
			MessageId:    j.ID,
			Body:         j.body,
		})
		if err != nil {
			fail("job %s: %v", j.ID, err)
		}
		select {
		case c, ok := <-confirms:
			if !ok {
				fail("job %s: the broker closed the channel: %v (is HERALD_PREFIX right, and did herald declare %s?)",
					j.ID, <-closed, exchange)
			}
			if !c.Ack {
				fail("job %s was refused (nack) by the broker", j.ID)
			}
		case e := <-closed:
			fail("job %s: the broker closed the channel: %v (is HERALD_PREFIX right, and did herald declare %s?)",
				j.ID, e, exchange)
		case <-time.After(confirmTimeout):
			fail("job %s: no publisher confirm within %s", j.ID, confirmTimeout)
		}
		select {
		case <-returns:
			fail("job %s was returned: nothing is bound to routing key %s on %s", j.ID, key, exchange)
		default:
		}
		fmt.Println(j.ID)
	}
}
