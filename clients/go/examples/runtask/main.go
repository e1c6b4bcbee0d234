// Command runtask runs one task of a llama-mesh deployment over gRPC and streams its events.
//
// Usage:
//
//	go run ./examples/runtask [-service ID] [-message TEXT | -input JSON] ADDRESS DEPLOYMENT
//
// ADDRESS is the gateway's (or the API server's) gRPC address, host:port. The task is created
// with ApiServer.CreateTask; its events are streamed with ApiServer.StreamEvents and printed
// one JSON object a line ({"index", "kind", "type", "data"}); the last line is the task's
// result ({"result": ...}). A failed or cancelled task, or any RPC error, exits with status 1.
// LLAMA_MESH_API_KEY, when set, is sent as a bearer token.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"

	llamameshv1 "github.com/llama-mesh/llama-mesh/clients/go/llamameshv1"
)

// eventLine is what one event prints as.
type eventLine struct {
	Index int64          `json:"index"`
	Kind  string         `json:"kind"`
	Type  string         `json:"type"`
	Data  map[string]any `json:"data"`
}

func main() {
	service := flag.String("service", "", "service id (empty: the deployment's default service)")
	message := flag.String("message", "Hello from Go", "input {\"message\": TEXT}")
	inputJSON := flag.String("input", "", "input as a JSON object (replaces -message)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: runtask [flags] ADDRESS DEPLOYMENT\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 2 {
		flag.Usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, flag.Arg(0), flag.Arg(1), *service, *message, *inputJSON); err != nil {
		fmt.Fprintf(os.Stderr, "runtask: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, address, deployment, service, message, inputJSON string) error {
	input, err := taskInput(message, inputJSON)
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connect to %s: %w", address, err)
	}
	defer conn.Close()
	if key := os.Getenv("LLAMA_MESH_API_KEY"); key != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
	}
	client := llamameshv1.NewApiServerClient(conn)

	created, err := client.CreateTask(ctx, &llamameshv1.CreateTaskRequest{
		Deployment: deployment,
		ServiceId:  service,
		Input:      input,
	})
	if err != nil {
		return fmt.Errorf("CreateTask: %w", err)
	}
	task := created.GetTask()
	fmt.Fprintf(os.Stderr, "task %s on service %s\n", task.GetTaskId(), task.GetServiceId())

	stream, err := client.StreamEvents(ctx, &llamameshv1.StreamEventsRequest{
		Deployment: deployment,
		TaskId:     task.GetTaskId(),
	})
	if err != nil {
		return fmt.Errorf("StreamEvents: %w", err)
	}
	out := json.NewEncoder(os.Stdout)
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return errors.New("the event stream ended without a final event")
		}
		if err != nil {
			return fmt.Errorf("StreamEvents: %w", err)
		}
		event := resp.GetEvent()
		data := event.GetData().AsMap()
		line := eventLine{event.GetIndex(), event.GetKind().String(), event.GetType(), data}
		if err := out.Encode(line); err != nil {
			return err
		}
		switch event.GetKind() {
		case llamameshv1.EventKind_EVENT_KIND_RESULT:
			return out.Encode(map[string]any{"result": data["result"]})
		case llamameshv1.EventKind_EVENT_KIND_FAILED:
			return fmt.Errorf("task failed: %v: %v", data["error_type"], data["error"])
		case llamameshv1.EventKind_EVENT_KIND_CANCELLED:
			return fmt.Errorf("task cancelled: %v", data["reason"])
		}
	}
}

// taskInput builds the keyword arguments of Workflow.run.
func taskInput(message, inputJSON string) (*structpb.Struct, error) {
	fields := map[string]any{"message": message}
	if inputJSON != "" {
		fields = nil
		if err := json.Unmarshal([]byte(inputJSON), &fields); err != nil || fields == nil {
			return nil, fmt.Errorf("-input must be a JSON object: %q", inputJSON)
		}
	}
	input, err := structpb.NewStruct(fields)
	if err != nil {
		return nil, fmt.Errorf("-input: %w", err)
	}
	return input, nil
}
