#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import SwiftProtobuf
import KuasarOCI
import KuasarSystem
import KuasarReactor
import KuasarWire
import KuasarContainer

/// A container cgroup's counters in the protobuf containerd decodes from Stats:
/// `io.containerd.cgroups.v1.Metrics` or `io.containerd.cgroups.v2.Metrics`.
public enum CgroupMetrics {
    public static func any(_ cgroup: Cgroup) throws -> Google_Protobuf_Any {
        let c = cgroup.counters()
        func v(_ k: String) -> UInt64 { c[k].map { $0 == UInt64.max ? 0 : $0 } ?? 0 }
        var any = Google_Protobuf_Any()
        switch cgroup.mode {
        case .v1:
            var m = Io_Containerd_Cgroups_V1_Metrics()
            m.pids.current = v("pids.current")
            m.pids.limit = v("pids.max")
            m.cpu.usage.total = v("cpuacct.usage")
            // cpuacct.stat counts USER_HZ (100 per second) ticks.
            m.cpu.usage.user = v("cpuacct.user") * 10_000_000
            m.cpu.usage.kernel = v("cpuacct.system") * 10_000_000
            m.cpu.usage.perCpu = cgroup.perCPUUsage()
            m.cpu.throttling.periods = v("cpu.nr_periods")
            m.cpu.throttling.throttledPeriods = v("cpu.nr_throttled")
            m.cpu.throttling.throttledTime = v("cpu.throttled_time")
            var mem = Io_Containerd_Cgroups_V1_MemoryStat()
            mem.cache = v("stat.cache"); mem.rss = v("stat.rss"); mem.rssHuge = v("stat.rss_huge")
            mem.mappedFile = v("stat.mapped_file"); mem.dirty = v("stat.dirty"); mem.writeback = v("stat.writeback")
            mem.pgPgIn = v("stat.pgpgin"); mem.pgPgOut = v("stat.pgpgout"); mem.pgFault = v("stat.pgfault")
            mem.pgMajFault = v("stat.pgmajfault"); mem.inactiveAnon = v("stat.inactive_anon")
            mem.activeAnon = v("stat.active_anon"); mem.inactiveFile = v("stat.inactive_file")
            mem.activeFile = v("stat.active_file"); mem.unevictable = v("stat.unevictable")
            mem.hierarchicalMemoryLimit = v("stat.hierarchical_memory_limit")
            mem.hierarchicalSwapLimit = v("stat.hierarchical_memsw_limit")
            mem.totalCache = v("stat.total_cache"); mem.totalRss = v("stat.total_rss")
            mem.totalRssHuge = v("stat.total_rss_huge"); mem.totalMappedFile = v("stat.total_mapped_file")
            mem.totalDirty = v("stat.total_dirty"); mem.totalWriteback = v("stat.total_writeback")
            mem.totalPgPgIn = v("stat.total_pgpgin"); mem.totalPgPgOut = v("stat.total_pgpgout")
            mem.totalPgFault = v("stat.total_pgfault"); mem.totalPgMajFault = v("stat.total_pgmajfault")
            mem.totalInactiveAnon = v("stat.total_inactive_anon"); mem.totalActiveAnon = v("stat.total_active_anon")
            mem.totalInactiveFile = v("stat.total_inactive_file"); mem.totalActiveFile = v("stat.total_active_file")
            mem.totalUnevictable = v("stat.total_unevictable")
            mem.usage.usage = v("memory.usage_in_bytes"); mem.usage.limit = v("memory.limit_in_bytes")
            mem.usage.max = v("memory.max_usage_in_bytes"); mem.usage.failcnt = v("memory.failcnt")
            mem.swap.usage = v("memory.memsw.usage_in_bytes"); mem.swap.limit = v("memory.memsw.limit_in_bytes")
            mem.swap.max = v("memory.memsw.max_usage_in_bytes")
            mem.kernel.usage = v("memory.kmem.usage_in_bytes"); mem.kernel.limit = v("memory.kmem.limit_in_bytes")
            m.memory = mem
            m.memoryOomControl.oomKillDisable = v("oom.oom_kill_disable")
            m.memoryOomControl.underOom = v("oom.under_oom")
            m.memoryOomControl.oomKill = v("oom.oom_kill")
            any.typeURL = Io_Containerd_Cgroups_V1_Metrics.protoMessageName
            any.value = try m.serializedData()
        case .v2:
            var m = Io_Containerd_Cgroups_V2_Metrics()
            m.pids.current = v("pids.current")
            m.pids.limit = v("pids.max")
            m.cpu.usageUsec = v("cpu.usage_usec"); m.cpu.userUsec = v("cpu.user_usec"); m.cpu.systemUsec = v("cpu.system_usec")
            m.cpu.nrPeriods = v("cpu.nr_periods"); m.cpu.nrThrottled = v("cpu.nr_throttled"); m.cpu.throttledUsec = v("cpu.throttled_usec")
            var mem = Io_Containerd_Cgroups_V2_MemoryStat()
            mem.anon = v("stat.anon"); mem.file = v("stat.file"); mem.kernelStack = v("stat.kernel_stack")
            mem.slab = v("stat.slab"); mem.sock = v("stat.sock"); mem.shmem = v("stat.shmem")
            mem.fileMapped = v("stat.file_mapped"); mem.fileDirty = v("stat.file_dirty"); mem.fileWriteback = v("stat.file_writeback")
            mem.anonThp = v("stat.anon_thp"); mem.inactiveAnon = v("stat.inactive_anon"); mem.activeAnon = v("stat.active_anon")
            mem.inactiveFile = v("stat.inactive_file"); mem.activeFile = v("stat.active_file"); mem.unevictable = v("stat.unevictable")
            mem.slabReclaimable = v("stat.slab_reclaimable"); mem.slabUnreclaimable = v("stat.slab_unreclaimable")
            mem.pgfault = v("stat.pgfault"); mem.pgmajfault = v("stat.pgmajfault")
            mem.usage = v("memory.current"); mem.usageLimit = v("memory.max")
            mem.swapUsage = v("memory.swap.current"); mem.swapLimit = v("memory.swap.max")
            m.memory = mem
            m.memoryEvents.low = v("events.low"); m.memoryEvents.high = v("events.high"); m.memoryEvents.max = v("events.max")
            m.memoryEvents.oom = v("events.oom"); m.memoryEvents.oomKill = v("events.oom_kill")
            any.typeURL = Io_Containerd_Cgroups_V2_Metrics.protoMessageName
            any.value = try m.serializedData()
        }
        return any
    }
}
