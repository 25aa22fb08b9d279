// kuasar-keeper: the daemon's parent and the subreaper of its containers. All of it is
// in CShims/keeper.c; this file only gives it a main.
#include "CShims.h"

int main(int argc, char **argv) { return ks_keeper_main(argc, argv); }
