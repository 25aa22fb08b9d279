# Two commands for a fresh Debian machine (root, as in CI):
#   make run    install what the daemon needs, build, start the daemon, run a first container in it
#   make test   install what the tests need, build with warnings as errors, run every test
SHELL := /bin/bash
APT_PACKAGES := liburing-dev libseccomp-dev pkg-config util-linux containerd runc busybox-static protobuf-compiler libprotobuf-dev python3-protobuf python3-pip golang-1.19-go golang-github-containerd-ttrpc-dev golang-github-containerd-containerd-dev python3-grpcio python3-h2 lz4 binutils
# The tests boot the guest image under QEMU, run containers with crun (the external-runtime kind),
# and build their wasm modules: WAT with wabt, C for wasm32-wasi with clang, lld and wasi-libc.
TEST_APT_PACKAGES := qemu-system-x86 crun wabt clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32
SWIFT_FLAGS := -Xswiftc -warnings-as-errors
SOCKET ?= /run/kuasar/kuasar.sock

.PHONY: deps test-deps build run test test-release bench clean install protos guest guest-if-missing runner-static

# apt-get only when something is missing, so repeated runs cost nothing.
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test-deps: deps
	@dpkg -s $(TEST_APT_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_APT_PACKAGES) >/dev/null; }

build: deps
	swift build $(SWIFT_FLAGS)

# The guest image of VM sandboxes: the agent linked statically (stdlib and
# FoundationEssentials only) by the toolchain's lld, a section per function so unused
# ones go, without unwind tables (guest/no-unwind-tables.ld says why), with link-time
# optimization of our code and its packages (0.2 MB: what no call reaches goes) and
# identical code folding (0.3 MB: lld folds functions whose bytes and relocations are the
# same — code only, never data; Swift gives functions no identity to compare, and the
# suite runs on the folded agent),
# stripped, as /init of an initramfs with the modules it loads,
# and the vmlinux of Debian's linux-image-amd64 (downloaded, never installed). Built in
# $(GUEST_DIR), installed where the daemon looks by default; a debug variant with busybox
# (kuasar.debug=1's shell) in $(GUEST_DIR)-debug. Incremental: a rebuild with nothing
# changed costs seconds.
GUEST_DIR := .build/guest
GUEST_INSTALL := /var/lib/kuasar/guest
guest: deps
	swift build -c release --product kuasar-agent --static-swift-stdlib -Xswiftc -static-executable -Xswiftc -Osize \
	  -Xswiftc -Xfrontend -Xswiftc -function-sections -Xswiftc -use-ld=lld -Xlinker -T -Xlinker $(CURDIR)/guest/no-unwind-tables.ld \
	  --experimental-lto-mode=full -Xlinker --icf=all --scratch-path .build-static
	mkdir -p $(GUEST_DIR)
	strip --strip-all -o $(GUEST_DIR)/kuasar-agent .build-static/release/kuasar-agent
	python3 guest/build.py --agent $(GUEST_DIR)/kuasar-agent --out $(GUEST_DIR) --cache .build/guest-cache
	python3 guest/build.py --debug --agent $(GUEST_DIR)/kuasar-agent --out $(GUEST_DIR)-debug --cache .build/guest-cache >/dev/null
	install -d $(GUEST_INSTALL) && install -m 0644 $(GUEST_DIR)/vmlinux $(GUEST_DIR)/initrd.lz4 $(GUEST_DIR)/manifest.json $(GUEST_INSTALL)/
	rm -rf $(GUEST_INSTALL)/modules && cp -a $(GUEST_DIR)/modules $(GUEST_INSTALL)/modules

guest-if-missing:
	@[ -f $(GUEST_DIR)/initrd.lz4 ] || $(MAKE) guest

# The main job: the daemon with its embedded defaults (state in /run/kuasar, API socket
# $(SOCKET)), its health, then a first container — a busybox rootfs made here — run
# through it with `kuasar run`. The daemon keeps running; Ctrl-C (SIGINT) stops it cleanly.
DEMO_ROOTFS := .build/demo-rootfs
run: build guest-if-missing
	@bin=$$(swift build $(SWIFT_FLAGS) --show-bin-path)/kuasar; \
	rm -rf $(DEMO_ROOTFS) && mkdir -p $(DEMO_ROOTFS)/bin $(DEMO_ROOTFS)/proc $(DEMO_ROOTFS)/dev $(DEMO_ROOTFS)/sys $(DEMO_ROOTFS)/tmp && \
	cp /bin/busybox $(DEMO_ROOTFS)/bin/ && for a in $$(/bin/busybox --list); do [ $$a = busybox ] || ln -sf busybox $(DEMO_ROOTFS)/bin/$$a; done; \
	$$bin daemon --socket $(SOCKET) & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null; wait $$pid' INT TERM; \
	for i in $$(seq 100); do $$bin health --socket $(SOCKET) >/dev/null 2>&1 && break; sleep 0.05; done; \
	$$bin health --socket $(SOCKET); \
	KUASAR_ROOT=$$(dirname $(SOCKET)) $$bin run --rootfs $(DEMO_ROOTFS) --hostname first -- \
	  sh -c 'echo "hello from a kuasar container: pid $$$$ on $$(hostname), $$(cat /proc/self/status | grep -c Cap) capability sets"'; \
	echo "first container exited with $$?; daemon running as pid $$pid (Ctrl-C stops it); try: $$bin ps --root $$(dirname $(SOCKET))"; \
	wait $$pid

test: build test-deps guest runner-static
	swift build $(SWIFT_FLAGS) --build-tests
	swift test $(SWIFT_FLAGS) --no-parallel

test-release: deps
	swift test -c release --no-parallel

# The wasm kind's runner as `make install` ships it: the Swift runtime linked in (glibc
# stays shared, so Wasmtime's dlopen works), so each module container skips loading and
# relocating a dozen Swift libraries (~1.3 ms of a 4.8 ms hello, measured). Its own scratch
# path: --static-swift-stdlib applies to a whole build.
RUNNER_STATIC := .build-runner/release/kuasar-wasm-run
runner-static: deps
	swift build -c release --product kuasar-wasm-run --static-swift-stdlib --scratch-path .build-runner

BENCH_APT_PACKAGES := golang-google-grpc-dev crun

bench: deps runner-static
	@dpkg -s $(BENCH_APT_PACKAGES) >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_APT_PACKAGES) >/dev/null
	swift build -c release
	cd perf && swift build -c release --disable-build-manifest-caching && ./.build/release/kuasar-perf all && \
	  ./.build/release/kuasar-perf container && ./.build/release/kuasar-perf pod

# kuasar, its keeper, the wasm kind's runner beside it (where the daemon looks), and the
# same binary as containerd's shim v2 runtimes: `io.containerd.kuasar.v2` (namespace),
# `io.containerd.kuasar-vm.v2`, `io.containerd.kuasar-wasm.v2`. BINDIR moves the binaries
# (the systemd unit and the config stay where the system keeps them).
BINDIR ?= /usr/local/bin
install: build runner-static
	install -d $(BINDIR)
	install -m 0755 $$(swift build $(SWIFT_FLAGS) --show-bin-path)/kuasar $(BINDIR)/kuasar
	install -m 0755 $$(swift build $(SWIFT_FLAGS) --show-bin-path)/kuasar-keeper $(BINDIR)/kuasar-keeper
	install -m 0755 $(RUNNER_STATIC) $(BINDIR)/kuasar-wasm-run
	for shim in containerd-shim-kuasar-v2 containerd-shim-kuasar-vm-v2 containerd-shim-kuasar-wasm-v2; do ln -sf kuasar $(BINDIR)/$$shim; done
	@if [ "$(BINDIR)" = /usr/local/bin ] && [ -d /etc/systemd/system ]; then install -m 0644 packaging/systemd/kuasar.service /etc/systemd/system/kuasar.service; \
	  echo "installed kuasar.service: systemctl daemon-reload && systemctl enable --now kuasar"; fi
	@[ -e /etc/kuasar/config.toml ] || { mkdir -p /etc/kuasar && $(BINDIR)/kuasar config default > /etc/kuasar/config.toml; }

clean:
	rm -rf .build .build-static .build-runner perf/.build

# Regenerates Sources/Runtime/Wire/Generated (KuasarWire: what the guest agent links too)
# and Sources/Runtime/Wire/Host/Generated (KuasarHostWire: HOST_PROTOS, the host's alone)
# from Protos/. Needs protoc (apt protobuf-compiler) and builds protoc-gen-swift from the
# swift-protobuf this package resolves (minutes, once; never in CI). containerd.task.v3 is
# v2's file under the v3 package, as in containerd 2.x; the runtime serves both services
# with v2's messages (the same bytes), so v3's types are the host's, for clients (tests,
# perf), and the guest agent does not link a second copy. Protos/host-module-mappings.asciipb
# tells the generator which imported types are KuasarWire's.
PROTO_OUT := Sources/Runtime/Wire/Generated
HOST_PROTO_OUT := Sources/Runtime/Wire/Host/Generated
HOST_PROTOS := containerd/services/sandbox/v1/sandbox.proto containerd/services/streaming/v1/streaming.proto \
  containerd/types/introspection.proto containerd/types/metrics.proto containerd/types/platform.proto \
  containerd/types/sandbox.proto containerd/types/transfer/streaming.proto grpc/health/v1/health.proto \
  kuasar/admin/v1/admin.proto cri/pod_sandbox_config.proto
PROTOC_SWIFT = protoc --plugin=protoc-gen-swift=.build-protoc/release/protoc-gen-swift \
  --swift_opt=Visibility=Public --swift_opt=FileNaming=PathToUnderscores -I Protos -I .build-protos -I /usr/include
protos:
	dpkg -s protobuf-compiler >/dev/null 2>&1 || apt-get install -y -qq protobuf-compiler
	swift package resolve
	test -x .build-protoc/release/protoc-gen-swift || swift build -c release --package-path .build/checkouts/swift-protobuf --scratch-path .build-protoc --product protoc-gen-swift
	rm -rf .build-protos && mkdir -p .build-protos/containerd/task/v3
	sed 's/^package containerd.task.v2;/package containerd.task.v3;/' Protos/containerd/task/v2/shim.proto > .build-protos/containerd/task/v3/shim.proto
	rm -f $(PROTO_OUT)/*.pb.swift $(HOST_PROTO_OUT)/*.pb.swift
	$(PROTOC_SWIFT) --swift_out=$(PROTO_OUT) \
	  $$(cd Protos && find . -name '*.proto' | sed 's|^\./||' | sort | grep -vxF $(foreach p,$(HOST_PROTOS),-e $(p)))
	$(PROTOC_SWIFT) --swift_opt=ProtoPathModuleMappings=Protos/host-module-mappings.asciipb --swift_out=$(HOST_PROTO_OUT) $(HOST_PROTOS) containerd/task/v3/shim.proto
