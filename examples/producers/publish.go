// Publish one herald job with publisher confirms (go get github.com/rabbitmq/amqp091-go).
package main

import (
	"context"
	"encoding/json"
	"log"
	"os"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func main() {
	url := os.Getenv("AMQP_URL")
	if url == "" {
		url = "amqp://guest:guest@127.0.0.1:5672/%2f"
	}
	job := map[string]any{
		"v": 1, "id": "alert-3", "vendor": "netease", "account": "default",
		"from": "system", "to": map[string]string{"group": "ops-room"},
		"key": "system.alert", "data": map[string]string{"level": "warn"},
	}
	body, _ := json.Marshal(job)
	conn, err := amqp.Dial(url)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		log.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	confirm, err := ch.PublishWithDeferredConfirmWithContext(ctx, "herald.jobs", "netease.default", false, false,
		amqp.Publishing{ContentType: "application/json", DeliveryMode: amqp.Persistent, MessageId: "alert-3", Body: body})
	if err != nil {
		log.Fatal(err)
	}
	if ok, err := confirm.WaitContext(ctx); err != nil || !ok {
		log.Fatalf("not confirmed: %v", err)
	}
	log.Println("published alert-3")
}
