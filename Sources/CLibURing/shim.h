// liburing's header sets _XOPEN_SOURCE; <features.h> first keeps it from clashing
// with the Glibc module's view of fd_set (see ../shared/MACHINE.md).
#include <features.h>
#include <liburing.h>
