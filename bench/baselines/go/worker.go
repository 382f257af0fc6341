// herald-bench baseline: consume QUEUE with amqp091-go (prefetch PREFETCH), a
// goroutine per delivery POSTs the body to RECEIVER_URL with net/http and acks
// on a 2xx answer (nacks it back otherwise).
package main

import (
	"bytes"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	amqp "github.com/rabbitmq/amqp091-go"
)

func main() {
	prefetch, err := strconv.Atoi(os.Getenv("PREFETCH"))
	if err != nil {
		prefetch = 200
	}
	receiver := os.Getenv("RECEIVER_URL")
	conn, err := amqp.Dial(os.Getenv("AMQP_URL"))
	if err != nil {
		log.Fatal(err)
	}
	ch, err := conn.Channel()
	if err != nil {
		log.Fatal(err)
	}
	if err := ch.Qos(prefetch, 0, false); err != nil {
		log.Fatal(err)
	}
	deliveries, err := ch.Consume(os.Getenv("QUEUE"), "go-baseline", false, false, false, false, nil)
	if err != nil {
		log.Fatal(err)
	}
	// net/http keeps only 2 idle connections per host by default; with a
	// goroutine per delivery every other request would open a new one.
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConnsPerHost = prefetch
	client := &http.Client{Transport: transport}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, os.Interrupt)
	go func() {
		<-stop
		conn.Close()
		os.Exit(0)
	}()
	for d := range deliveries {
		go func(d amqp.Delivery) {
			response, err := client.Post(receiver, "application/json", bytes.NewReader(d.Body))
			if err == nil {
				_, err = io.Copy(io.Discard, response.Body)
				response.Body.Close()
			}
			if err == nil && response.StatusCode/100 == 2 {
				d.Ack(false)
			} else {
				d.Nack(false, true)
			}
		}(d)
	}
}
