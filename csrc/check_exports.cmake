# Post-build check (cmake -P): fail if postembed_fast._C exports any defined dynamic
# symbol besides PyInit__C (e.g. a statically linked libstdc++'s __cxa_throw).
#   cmake -DNM=<nm> -DMODULE=<path of _C.so> -P check_exports.cmake
cmake_minimum_required(VERSION 3.18)
if(NOT NM OR NOT EXISTS "${NM}")
  message(WARNING "postembed_fast: nm not found, exported symbols of ${MODULE} not checked")
  return()
endif()
execute_process(COMMAND "${NM}" -D --defined-only "${MODULE}"
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "postembed_fast: '${NM} -D --defined-only ${MODULE}' failed: ${err}")
endif()
string(REPLACE "\n" ";" lines "${out}")
set(exported "")
set(extra "")
foreach(line IN LISTS lines)
  if(line MATCHES "^[0-9a-fA-F]* *[A-Za-z] ([^ ]+)$")
    list(APPEND exported "${CMAKE_MATCH_1}")
    if(NOT CMAKE_MATCH_1 STREQUAL "PyInit__C")
      list(APPEND extra "${CMAKE_MATCH_1}")
    endif()
  endif()
endforeach()
list(LENGTH extra n_extra)
if(n_extra GREATER 0 OR NOT "PyInit__C" IN_LIST exported)
  list(SUBLIST extra 0 20 shown)
  string(REPLACE ";" "\n  " shown "${shown}")
  message(FATAL_ERROR "postembed_fast: ${MODULE} must export only PyInit__C, "
                      "but exports ${n_extra} more symbol(s), e.g.:\n  ${shown}\n"
                      "(check the linker flags: csrc/_C.map, --exclude-libs)")
endif()
message(STATUS "postembed_fast: ${MODULE} exports only PyInit__C")
