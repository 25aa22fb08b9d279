// grpc-peer: grpc-go (Debian's golang-google-grpc-dev) as a benchmark peer, with a
// pass-through codec so both servers echo the same raw bytes.
//
//	grpc-peer server SOCKET                      echo /test.Echo/Echo until killed
//	grpc-peer bench SOCKET CONNS PER SECONDS     unary calls; prints calls calls/s p50_us p99_us
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string   { return "proto" }
func (rawCodec) String() string { return "proto" }

func main() {
	switch os.Args[1] {
	case "server":
		server(os.Args[2])
	case "bench":
		bench(os.Args[2], os.Args[3], os.Args[4], os.Args[5])
	}
}

func server(socket string) {
	os.Remove(socket)
	l, err := net.Listen("unix", socket)
	if err != nil {
		fmt.Println("listen-error", err)
		os.Exit(1)
	}
	s := grpc.NewServer(grpc.CustomCodec(rawCodec{}), grpc.UnknownServiceHandler(func(srv interface{}, stream grpc.ServerStream) error {
		var msg []byte
		if err := stream.RecvMsg(&msg); err != nil {
			return err
		}
		return stream.SendMsg(&msg)
	}))
	fmt.Println("ready")
	s.Serve(l)
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
		cc, err := grpc.Dial("passthrough:///kuasar", grpc.WithInsecure(), grpc.WithContextDialer(
			func(ctx context.Context, _ string) (net.Conn, error) { return net.Dial("unix", socket) }))
		if err != nil {
			fmt.Println("dial-error", err)
			os.Exit(1)
		}
		defer cc.Close()
		for g := 0; g < per; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				req := []byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
				local := make([]time.Duration, 0, 100000)
				for time.Now().Before(deadline) {
					var resp []byte
					t0 := time.Now()
					if err := cc.Invoke(context.Background(), "/test.Echo/Echo", &req, &resp, grpc.ForceCodec(rawCodec{})); err != nil {
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
