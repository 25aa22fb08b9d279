// ttrpc-peer: the Go ttrpc library (Debian's golang-github-containerd-ttrpc-dev) as a
// real peer for the Swift tests, speaking containerd's own generated Task types.
//
//	ttrpc-peer client SOCKET SCENARIO   drive a server, print one result line
//	ttrpc-peer server SOCKET            serve containerd.task.v2.Task until killed
//	ttrpc-peer bench SOCKET CONNS PER SECONDS
//	                                    unary State calls from CONNS connections with
//	                                    PER callers each; prints calls/s p50_us p99_us
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/runtime/v2/task"
	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/status"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: ttrpc-peer client SOCKET SCENARIO | server SOCKET")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "client":
		client(os.Args[2], os.Args[3])
	case "server":
		server(os.Args[2])
	case "bench":
		bench(os.Args[2], os.Args[3], os.Args[4], os.Args[5])
	}
}

func withNamespace(ctx context.Context, ns string) context.Context {
	md := ttrpc.MD{}
	md.Set("containerd-namespace-ttrpc", ns)
	return ttrpc.WithMetadata(ctx, md)
}

func client(socket, scenario string) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		fmt.Println("dial-error", err)
		os.Exit(1)
	}
	c := ttrpc.NewClient(conn)
	defer c.Close()
	tc := task.NewTaskClient(c)
	ctx := withNamespace(context.Background(), "k8s.io")

	switch scenario {
	case "state":
		r, err := tc.State(ctx, &task.StateRequest{ID: "c1", ExecID: "e1"})
		if err != nil {
			fmt.Println("error", status.Code(err), err)
			return
		}
		fmt.Printf("ok id=%s exec=%s bundle=%s pid=%d status=%s exit=%d exited=%d stdout=%s terminal=%v\n",
			r.ID, r.ExecID, r.Bundle, r.Pid, r.Status, r.ExitStatus, r.ExitedAt.Unix(), r.Stdout, r.Terminal)
	case "deadline":
		dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := tc.Wait(dctx, &task.WaitRequest{ID: "hang"})
		// Both deadlines expire together: the server's DeadlineExceeded answer or the
		// client's own context error may win the race.
		code := status.Code(err).String()
		if errors.Is(err, context.DeadlineExceeded) {
			code = "DeadlineExceeded"
		}
		elapsed := time.Since(start).Milliseconds()
		// The server's timer started when the request arrived, a moment after ours: the
		// connection stays open until it has fired, or the server would see a disconnect
		// (Cancelled) instead of the deadline.
		time.Sleep(300 * time.Millisecond)
		fmt.Printf("code=%s elapsed_ms=%d\n", code, elapsed)
	case "unimplemented":
		_, err := tc.Checkpoint(ctx, &task.CheckpointTaskRequest{ID: "c1"})
		fmt.Printf("code=%s msg=%s\n", status.Code(err), status.Convert(err).Message())
	case "notfound":
		_, err := tc.State(ctx, &task.StateRequest{ID: "missing"})
		fmt.Printf("code=%s msg=%s\n", status.Code(err), status.Convert(err).Message())
	case "large":
		id := strings.Repeat("x", 4*1024*1024-4096)
		r, err := tc.State(ctx, &task.StateRequest{ID: id})
		if err != nil {
			fmt.Println("error", status.Code(err), err)
			return
		}
		fmt.Printf("ok id_len=%d bundle_len=%d\n", len(r.ID), len(r.Bundle))
	case "oversized":
		id := strings.Repeat("y", 4*1024*1024+16)
		_, err := tc.State(ctx, &task.StateRequest{ID: id})
		// Then the connection must still work.
		r, err2 := tc.State(ctx, &task.StateRequest{ID: "after"})
		after := "broken"
		if err2 == nil {
			after = r.ID
		}
		fmt.Printf("code=%s after=%s\n", status.Code(err), after)
	case "concurrent":
		var wg sync.WaitGroup
		var mu sync.Mutex
		good := 0
		for i := 0; i < 100; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				id := fmt.Sprintf("c%d", i)
				r, err := tc.State(ctx, &task.StateRequest{ID: id})
				if err == nil && r.ID == id && r.Pid == uint32(1000+i) {
					mu.Lock()
					good++
					mu.Unlock()
				}
			}(i)
		}
		wg.Wait()
		fmt.Printf("ok good=%d\n", good)
	case "disconnect":
		// Start a Wait that the server holds, then vanish mid-call.
		go tc.Wait(ctx, &task.WaitRequest{ID: "hang"})
		time.Sleep(100 * time.Millisecond)
		fmt.Println("gone")
		os.Exit(0)
	default:
		fmt.Println("unknown scenario", scenario)
		os.Exit(2)
	}
}

type service struct {
	task.TaskService // methods not overridden panic; the tests call only these
}

func (s *service) State(ctx context.Context, r *task.StateRequest) (*task.StateResponse, error) {
	ns, _ := ttrpc.GetMetadataValue(ctx, "containerd-namespace-ttrpc")
	if r.ID == "missing" {
		return nil, status.Errorf(5, "container %q not found", r.ID)
	}
	return &task.StateResponse{ID: r.ID, ExecID: r.ExecID, Bundle: "/run/bundle/" + ns, Pid: 42, ExitStatus: 3,
		ExitedAt: time.Unix(1700000000, 0)}, nil
}

func (s *service) Wait(ctx context.Context, r *task.WaitRequest) (*task.WaitResponse, error) {
	if d, err := time.ParseDuration(r.ID); err == nil {
		time.Sleep(d)
	}
	return &task.WaitResponse{ExitStatus: 7, ExitedAt: time.Unix(1700000001, 0)}, nil
}

func server(socket string) {
	os.Remove(socket)
	l, err := net.Listen("unix", socket)
	if err != nil {
		fmt.Println("listen-error", err)
		os.Exit(1)
	}
	s, err := ttrpc.NewServer()
	if err != nil {
		fmt.Println("server-error", err)
		os.Exit(1)
	}
	task.RegisterTaskService(s, &service{})
	fmt.Println("ready")
	s.Serve(context.Background(), l)
}

func bench(socket, connsArg, perArg, secondsArg string) {
	var conns, per int
	var seconds float64
	fmt.Sscan(connsArg, &conns)
	fmt.Sscan(perArg, &per)
	fmt.Sscan(secondsArg, &seconds)
	var mu sync.Mutex
	var lat []time.Duration
	var wg sync.WaitGroup
	deadline := time.Now().Add(time.Duration(seconds * float64(time.Second)))
	start := time.Now()
	for c := 0; c < conns; c++ {
		conn, err := net.Dial("unix", socket)
		if err != nil {
			fmt.Println("dial-error", err)
			os.Exit(1)
		}
		client := ttrpc.NewClient(conn)
		defer client.Close()
		tc := task.NewTaskClient(client)
		for g := 0; g < per; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx := withNamespace(context.Background(), "bench")
				local := make([]time.Duration, 0, 100000)
				req := &task.StateRequest{ID: "c1"}
				for time.Now().Before(deadline) {
					t0 := time.Now()
					if _, err := tc.State(ctx, req); err != nil {
						fmt.Println("call-error", err)
						os.Exit(1)
					}
					local = append(local, time.Since(t0))
				}
				mu.Lock()
				lat = append(lat, local...)
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	p := func(q float64) float64 { return float64(lat[int(float64(len(lat)-1)*q)].Nanoseconds()) / 1000 }
	fmt.Printf("%d %.1f %.2f %.2f\n", len(lat), float64(len(lat))/elapsed, p(0.5), p(0.99))
}
