// Stand-in for <Foundation/Foundation.h>: the Foundation classes, types and macros that
// csrc/mps/ops.mm and torch's ATen/mps headers use, written from Apple's documented API
// (Foundation reference). Declarations only: this lets clang type-check Objective-C++
// host code on Linux (tests/test_mps_host_compile.py); nothing here runs. See ../README.md.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <dispatch/dispatch.h>

typedef bool BOOL;  // arm64 macOS: BOOL is bool
#define YES true
#define NO false
#ifndef nil
#define nil nullptr
#endif
#ifndef Nil
#define Nil nullptr
#endif

typedef long NSInteger;
typedef unsigned long NSUInteger;
typedef NSUInteger NSStringEncoding;

#define NS_ENUM(type, name) enum name : type name; enum name : type
#define NS_OPTIONS(type, name) enum name : type name; enum name : type
#define NS_RETURNS_INNER_POINTER __attribute__((objc_returns_inner_pointer))
#define API_AVAILABLE(...)
#define NS_SWIFT_NAME(...)

enum { NSUTF8StringEncoding = 4 };

@class NSString, NSError, NSDictionary;

@protocol NSObject
- (BOOL)isEqual:(id)object;
@property(readonly) NSUInteger hash;
@end

__attribute__((objc_root_class))
@interface NSObject <NSObject>
+ (instancetype)alloc;
+ (instancetype)new;
- (instancetype)init;
@end

@protocol NSCopying
- (id)copyWithZone:(void*)zone;
@end

@interface NSString : NSObject <NSCopying>
+ (instancetype)stringWithUTF8String:(const char*)nullTerminatedCString;
- (instancetype)initWithBytes:(const void*)bytes length:(NSUInteger)len encoding:(NSStringEncoding)encoding;
- (instancetype)initWithUTF8String:(const char*)nullTerminatedCString;
@property(readonly) const char* UTF8String NS_RETURNS_INNER_POINTER;
@property(readonly) NSUInteger length;
@end

@interface NSDictionary<KeyType, ObjectType> : NSObject
@property(readonly) NSUInteger count;
- (ObjectType)objectForKey:(KeyType)aKey;
@end

@interface NSError : NSObject
@property(readonly) NSInteger code;
@property(readonly, copy) NSString* domain;
@property(readonly, copy) NSString* localizedDescription;
@end

@interface NSException : NSObject
@property(readonly, copy) NSString* name;
@property(readonly, copy) NSString* reason;
@end
